//! Running `iptables-save` and `iptables-restore`: the only I/O of the
//! crate, and errors that say what to do when it fails.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::options::InterceptConfig;
use crate::plan::{Plan, plan_cleanup, plan_install};

/// Why the rules could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// An iptables program is not installed or not at the given path.
    #[error(
        "`{}` was not found: install iptables (Debian and Ubuntu: `apt install iptables`) or give its path with --iptables (`-save` and `-restore` are looked for beside it)",
        program.display()
    )]
    NotFound {
        /// The program.
        program: PathBuf,
    },
    /// An iptables program could not be started.
    #[error("cannot run `{}`: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An iptables program ran and failed.
    #[error("{}", failure(program, *status, stderr, input.as_deref()))]
    Failed {
        /// The program.
        program: PathBuf,
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
        /// The input it was given, if any.
        input: Option<String>,
    },
}

fn failure(program: &Path, status: ExitStatus, stderr: &str, input: Option<&str>) -> String {
    let mut message = format!("`{}` failed ({status})", program.display());
    let stderr = stderr.trim_end();
    if stderr.is_empty() {
        message.push_str(" and printed nothing");
    } else {
        message.push_str(":\n");
        message.push_str(stderr);
    }
    if stderr.contains("Permission denied") || stderr.contains("must be root") {
        message.push_str(
            "\n(init changes the pod's network namespace: run it as root with the NET_ADMIN and NET_RAW capabilities, as a Kubernetes init container)",
        );
    }
    if let Some(input) = input {
        message.push_str("\nits input was:");
        for (n, line) in input.lines().enumerate() {
            message.push_str(&format!("\n{:>4}  {line}", n + 1));
        }
    }
    message
}

/// The iptables programs to use: `iptables-save` and `iptables-restore`
/// named after the chosen `iptables` (`iptables-legacy` →
/// `iptables-legacy-save`, `iptables-legacy-restore`) and in its directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iptables {
    save: PathBuf,
    restore: PathBuf,
}

impl Iptables {
    /// The programs beside `iptables` (a path, or a name looked up in
    /// `PATH`).
    pub fn new(iptables: &Path) -> Self {
        let sibling = |suffix: &str| {
            let mut name = OsString::from(iptables.file_name().unwrap_or(iptables.as_os_str()));
            name.push(suffix);
            iptables.with_file_name(name)
        };
        Iptables {
            save: sibling("-save"),
            restore: sibling("-restore"),
        }
    }

    /// The `iptables-save` program.
    pub fn save_program(&self) -> &Path {
        &self.save
    }

    /// The `iptables-restore` program.
    pub fn restore_program(&self) -> &Path {
        &self.restore
    }

    /// The nat table, as `iptables-save -t nat` prints it.
    pub fn save_nat(&self) -> Result<String, InterceptError> {
        let output = run(&self.save, &["-t", "nat"], None)?;
        Ok(String::from_utf8_lossy(&output).into_owned())
    }

    /// Applies `input` with `iptables-restore --noflush`: one transaction
    /// that leaves every chain it does not name as it was.
    pub fn restore_noflush(&self, input: &str) -> Result<(), InterceptError> {
        run(&self.restore, &["--noflush"], Some(input)).map(drop)
    }
}

/// Runs `program` with `args`, feeding it `input`; its stdout on success.
fn run(program: &Path, args: &[&str], input: Option<&str>) -> Result<Vec<u8>, InterceptError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => InterceptError::NotFound {
                program: program.to_owned(),
            },
            _ => InterceptError::Spawn {
                program: program.to_owned(),
                source,
            },
        })?;
    let stdin = child.stdin.take();
    // The input is written from another thread so that a program that
    // prints much before reading all of it cannot block on a full pipe; a
    // write error (the program exited early) shows in its status and
    // stderr below.
    let output = std::thread::scope(|scope| {
        if let (Some(mut stdin), Some(input)) = (stdin, input) {
            scope.spawn(move || {
                let _ = stdin.write_all(input.as_bytes());
            });
        }
        child.wait_with_output()
    })
    .map_err(|source| InterceptError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(InterceptError::Failed {
            program: program.to_owned(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            input: input.map(str::to_owned),
        })
    }
}

/// Installs `config`'s rules: reads the nat table, then applies
/// [`plan_install`] in one `iptables-restore --noflush`. Running it again
/// leaves the same rules; running it with another config replaces ours.
pub fn install(iptables: &Iptables, config: &InterceptConfig) -> Result<Plan, InterceptError> {
    let plan = plan_install(&iptables.save_nat()?, config);
    iptables.restore_noflush(&plan.restore_input)?;
    Ok(plan)
}

/// Removes our jumps and chains: reads the nat table, then applies
/// [`plan_cleanup`]; changes nothing (and succeeds) when none is there.
pub fn cleanup(iptables: &Iptables) -> Result<Plan, InterceptError> {
    let plan = plan_cleanup(&iptables.save_nat()?);
    if !plan.is_noop() {
        iptables.restore_noflush(&plan.restore_input)?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_restore_are_found_beside_the_chosen_iptables() {
        let default = Iptables::new(Path::new("iptables"));
        assert_eq!(default.save_program(), Path::new("iptables-save"));
        assert_eq!(default.restore_program(), Path::new("iptables-restore"));
        let legacy = Iptables::new(Path::new("/usr/sbin/iptables-legacy"));
        assert_eq!(
            legacy.save_program(),
            Path::new("/usr/sbin/iptables-legacy-save")
        );
        assert_eq!(
            legacy.restore_program(),
            Path::new("/usr/sbin/iptables-legacy-restore")
        );
    }

    #[test]
    fn a_missing_program_is_named_with_what_to_do() {
        let iptables = Iptables::new(Path::new("/nonexistent/iptables-nope"));
        let error = iptables.save_nat().unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, InterceptError::NotFound { .. }),
            "{error:?}"
        );
        assert!(
            message.contains("`/nonexistent/iptables-nope-save` was not found"),
            "{message}"
        );
        assert!(message.contains("--iptables"), "{message}");
    }

    #[test]
    fn a_failing_program_shows_its_stderr_and_numbered_input() {
        // `sh -c` stands in for a failing iptables-restore.
        let error = run(
            Path::new("sh"),
            &[
                "-c",
                "cat >/dev/null; echo 'Error occurred at line: 2' >&2; exit 2",
            ],
            Some("*nat\n-A NOPE -j RETURN\nCOMMIT\n"),
        )
        .unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with("`sh` failed (exit status: 2):\nError occurred at line: 2\n"),
            "{message}"
        );
        assert!(message.contains("\n   2  -A NOPE -j RETURN"), "{message}");
    }
}
