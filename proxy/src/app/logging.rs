//! Logs through `tracing`: human-readable lines by default, or one JSON
//! object per line (fields at the top level, as ELK and Loki ingest them;
//! or the Elastic Common Schema: `log_lines`), with a filter the admin
//! `/log-level` endpoint changes at run time. In the JSON formats the
//! access log's lines are written from the request's record directly
//! (`log_lines::JsonAccessLog`), not as `tracing` events; the same filter
//! decides for them.
//!
//! Lines are written to standard output in batches by a thread of their
//! own (`log_writer`), so a request never waits on the terminal or the log
//! collector, nor wakes a thread per line. If standard output stalls so
//! long that the buffer (16 MiB) fills, further lines are dropped rather
//! than traffic stopped, and counted in `infermesh_log_lines_dropped_total`.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use crate::app::log_lines::{JsonAccessLog, JsonLines, JsonShape};
use crate::app::log_writer::{self, BatchWriter, WriterGuard};
use crate::server::access_entry::{AccessLogWriter, TracingAccessLog};

use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines, coloured on a terminal.
    #[default]
    Human,
    /// One JSON object per line, the fields at the top level.
    Json,
    /// One JSON object per line in the Elastic Common Schema: access lines
    /// with `@timestamp`, `http.*`, `url.*`, `event.duration`...,
    /// infermesh's own fields under `infermesh.`.
    Ecs,
}

/// Changes the log filter of the running process.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
    dropped: BatchWriter,
    /// Where access-log lines go in this format.
    access_writer: Arc<dyn AccessLogWriter>,
    /// Writes the lines still queued when dropped, at exit.
    _writer: WriterGuard,
}

impl LogControl {
    /// The filter in force, in `RUST_LOG` syntax.
    pub fn filter(&self) -> String {
        self.current.lock().expect("log filter lock").clone()
    }

    /// A metric counting the log lines dropped because standard output
    /// could not keep up.
    pub fn dropped_lines_metric(&self) -> Box<dyn prometheus::core::Collector> {
        Box::new(DroppedLines {
            desc: prometheus::core::Desc::new(
                DROPPED_LINES.into(),
                DROPPED_LINES_HELP.into(),
                Vec::new(),
                Default::default(),
            )
            .expect("valid metric description"),
            counter: self.dropped.clone(),
        })
    }

    /// The writer of access-log lines in the log's format: `tracing`
    /// events for the human format, lines written straight for the JSON
    /// ones.
    pub(crate) fn access_writer(&self) -> Arc<dyn AccessLogWriter> {
        self.access_writer.clone()
    }

    /// Replaces the filter, e.g. `debug` or `info,infermesh::access=off`.
    pub fn set_filter(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives)
            .map_err(|e| format!("invalid log filter {directives:?}: {e}"))?;
        self.handle.reload(filter).map_err(|e| e.to_string())?;
        *self.current.lock().expect("log filter lock") = directives.to_owned();
        Ok(())
    }
}

/// Installs the global subscriber writing to standard output.
pub fn init(format: LogFormat, directives: &str) -> anyhow::Result<LogControl> {
    let filter = EnvFilter::try_new(directives)
        .map_err(|e| anyhow::anyhow!("invalid log filter {directives:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let (writer, guard) = log_writer::start(std::io::stdout(), log_writer::FLUSH_INTERVAL);
    let writer_errors = writer.clone();
    let (output, access_writer): (_, Arc<dyn AccessLogWriter>) = match format {
        LogFormat::Human => (
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(std::io::stdout().is_terminal())
                .boxed(),
            Arc::new(TracingAccessLog),
        ),
        LogFormat::Json | LogFormat::Ecs => {
            let shape = if format == LogFormat::Ecs {
                JsonShape::Ecs
            } else {
                JsonShape::Infermesh
            };
            let access = Arc::new(JsonAccessLog::new(shape, writer.clone()));
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .fmt_fields(JsonFields::new())
                .event_format(JsonLines::new(shape))
                .boxed();
            (layer, access)
        }
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()?;
    Ok(LogControl {
        handle,
        current: Mutex::new(directives.to_owned()),
        dropped: writer_errors,
        access_writer,
        _writer: guard,
    })
}

const DROPPED_LINES: &str = "infermesh_log_lines_dropped_total";
const DROPPED_LINES_HELP: &str = "Log lines dropped because standard output could not keep up.";

/// Reports the log writer's count of dropped lines when scraped.
struct DroppedLines {
    desc: prometheus::core::Desc,
    counter: BatchWriter,
}

impl prometheus::core::Collector for DroppedLines {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let counter =
            prometheus::IntCounter::new(DROPPED_LINES, DROPPED_LINES_HELP).expect("valid counter");
        counter.inc_by(self.counter.dropped_lines());
        prometheus::core::Collector::collect(&counter)
    }
}
