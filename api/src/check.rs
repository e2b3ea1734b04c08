//! Collecting located validation errors for one resource.

use crate::Origin;
use crate::diagnostic::Diagnostic;
use crate::duration::Duration;
use crate::path::FieldPath;

/// Records problems found in one resource, each at a field path that the
/// resource's [`Origin`] turns into a file, line and column.
pub(crate) struct Checker<'a> {
    origin: &'a Origin,
    /// `Kind/name`; `None` for a resource whose name is missing.
    resource: Option<String>,
    out: &'a mut Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    pub(crate) fn new(
        origin: &'a Origin,
        resource: Option<String>,
        out: &'a mut Vec<Diagnostic>,
    ) -> Self {
        Checker {
            origin,
            resource,
            out,
        }
    }

    /// Records that the field at `path` is wrong.
    pub(crate) fn error(&mut self, path: FieldPath, message: impl Into<String>) {
        self.out.push(
            self.origin
                .diagnostic(self.resource.clone(), &path, message.into()),
        );
    }

    /// Records an error unless `min <= value <= max`.
    pub(crate) fn duration_within(
        &mut self,
        path: FieldPath,
        value: Duration,
        min: Duration,
        max: Duration,
    ) {
        if value < min {
            self.error(path, format!("{value} is too short; the minimum is {min}"));
        } else if value > max {
            self.error(path, format!("{value} is too long; the maximum is {max}"));
        }
    }
}
