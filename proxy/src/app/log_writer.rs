//! Where every log line goes: this module owns the hand-off from the
//! threads that serve traffic to the one thread that writes standard
//! output.
//!
//! An access-log line is appended to a shared buffer under a short lock,
//! and nothing else happens on the request's thread: no wake-up, no
//! system call. (Other lines, few and read as things happen, wake the
//! writer at once.) The
//! writer thread sleeps until a first line arrives, lets the lines of the
//! next [`FLUSH_INTERVAL`] gather (or fewer, once [`BATCH_BYTES`] are
//! waiting) and writes them with one `write`. At thousands of requests a
//! second that is a few dozen wake-ups and writes a second instead of one
//! of each per access-log line, the way Envoy's access-log files are
//! flushed on a timer. An idle proxy's writer does not wake at all.
//!
//! The buffer is bounded ([`MAX_PENDING_BYTES`]): when standard output
//! stalls so long that it fills, further lines are dropped, never traffic
//! stopped or memory grown, and counted in
//! `infermesh_log_lines_dropped_total`. At exit, the lines still waiting
//! are written (within [`SHUTDOWN_WAIT`]).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::server::access_entry::ACCESS_TARGET;

/// How long lines may wait for the lines after them before they are
/// written: what a line on the terminal or in a collector lags by, at
/// most.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Lines waiting that are worth a write at once, without waiting out the
/// interval.
pub(crate) const BATCH_BYTES: usize = 256 * 1024;

/// Lines waiting beyond which further lines are dropped: standard output
/// has not kept up for a while, and the proxy's memory must not pay for
/// it.
pub(crate) const MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;

/// How long the exit waits for the last lines to be written.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// The writing end: cheap to clone, handed to the log formatter, which
/// writes each formatted line with one `write` call, and to the JSON
/// access-log writer, which queues each line with [`BatchWriter::append`].
#[derive(Clone)]
pub(crate) struct BatchWriter {
    shared: Arc<Shared>,
    /// Lines of this writer go out at once rather than with the next
    /// batch: every line but the access log's, which are few, and which
    /// people and tools read as things happen ("listening", a refused
    /// config).
    urgent: bool,
}

/// Stops the writer thread when dropped, after it wrote what was waiting.
pub(crate) struct WriterGuard {
    shared: Arc<Shared>,
    /// Says the writer thread has written the last lines. (In a mutex
    /// only to be shared: the guard lives in the shared log control.)
    done: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// What the formatting threads and the writer thread share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer: a first line, a full batch, or the exit.
    wake: Condvar,
    /// Lines dropped, because the buffer was full or the write failed.
    dropped: AtomicU64,
}

/// The buffer and what the writer thread is doing.
#[derive(Default)]
struct State {
    /// Lines not yet written, whole lines one after the other.
    pending: Vec<u8>,
    /// The writer thread sleeps until a line arrives: the next line must
    /// wake it.
    waiting_for_lines: bool,
    /// The process is exiting: write what is left and stop.
    stopping: bool,
    /// An urgent line is waiting: write without waiting out the interval.
    flush_now: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A formatter that panicked mid-append leaves whole lines at worst
        // one cut short; the log goes on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts the writer thread, writing to `output` batches of access lines
/// gathered for `interval` ([`FLUSH_INTERVAL`]; tests give their own).
pub(crate) fn start(
    output: impl Write + Send + 'static,
    interval: Duration,
) -> (BatchWriter, WriterGuard) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
    });
    let (done_tx, done) = std::sync::mpsc::channel();
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name("infermesh-log".into())
        .spawn(move || {
            write_batches(&thread_shared, output, interval);
            let _ = done_tx.send(());
        })
        .expect("the log writer thread starts");
    (
        BatchWriter {
            shared: shared.clone(),
            urgent: false,
        },
        WriterGuard {
            shared,
            done: Mutex::new(done),
        },
    )
}

impl BatchWriter {
    /// Lines dropped so far.
    pub(crate) fn dropped_lines(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Queues `line` (one or more whole lines).
    pub(crate) fn append(&self, line: &[u8]) {
        let mut state = self.shared.state();
        if state.pending.len() + line.len() > MAX_PENDING_BYTES {
            drop(state);
            self.shared
                .dropped
                .fetch_add(lines_in(line), Ordering::Relaxed);
            return;
        }
        let before = state.pending.len();
        state.pending.extend_from_slice(line);
        state.flush_now |= self.urgent;
        let wake = std::mem::take(&mut state.waiting_for_lines)
            || self.urgent
            || (before < BATCH_BYTES && state.pending.len() >= BATCH_BYTES);
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
    }
}

impl Write for BatchWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }

    /// Access-log lines wait for their batch; any other line goes out at
    /// once.
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        BatchWriter {
            shared: self.shared.clone(),
            urgent: meta.target() != ACCESS_TARGET,
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.shared.state().stopping = true;
        self.shared.wake.notify_one();
        if let Ok(done) = self.done.lock() {
            let _ = done.recv_timeout(SHUTDOWN_WAIT);
        }
    }
}

/// The writer thread: waits for lines, lets a batch gather, writes it;
/// until the exit, when it writes what is left.
fn write_batches(shared: &Shared, mut output: impl Write, interval: Duration) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.state();
        while state.pending.is_empty() && !state.stopping {
            state.waiting_for_lines = true;
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.waiting_for_lines = false;
        if !state.stopping && !state.flush_now && state.pending.len() < BATCH_BYTES {
            state = shared
                .wake
                .wait_timeout_while(state, interval, |s| {
                    !s.stopping && !s.flush_now && s.pending.len() < BATCH_BYTES
                })
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::swap(&mut state.pending, &mut batch);
        state.flush_now = false;
        let stopping = state.stopping && state.pending.is_empty();
        drop(state);
        if output
            .write_all(&batch)
            .and_then(|()| output.flush())
            .is_err()
        {
            shared
                .dropped
                .fetch_add(lines_in(&batch), Ordering::Relaxed);
        }
        batch.clear();
        // A burst's buffer is not kept for ever.
        batch.shrink_to(BATCH_BYTES);
        if stopping {
            return;
        }
    }
}

/// The lines in `bytes` (a last line without its newline counts too).
fn lines_in(bytes: &[u8]) -> u64 {
    let newlines = memchr::memchr_iter(b'\n', bytes).count();
    let unterminated = usize::from(!bytes.is_empty() && !bytes.ends_with(b"\n"));
    (newlines + unterminated) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that keeps what is written, and can be held shut (a
    /// stalled terminal or collector) or made to fail.
    #[derive(Clone, Default)]
    struct Output {
        written: Arc<Mutex<Vec<Vec<u8>>>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
        held: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Output {
        fn hold(&self, held: bool) {
            *self.held.0.lock().unwrap() = held;
            self.held.1.notify_all();
        }
    }

    impl Write for Output {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut held = self.held.0.lock().unwrap();
            while *held {
                held = self.held.1.wait(held).unwrap();
            }
            if self.fail.load(Ordering::Relaxed) {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.written.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(output: &Output) -> String {
        String::from_utf8(output.written.lock().unwrap().concat()).unwrap()
    }

    /// An interval no test waits out: a line written before the guard is
    /// dropped was written early, not by the timer.
    const NEVER: Duration = Duration::from_secs(3600);

    /// Waits until `output` holds something (an error after 10 s).
    fn wait_for_output(output: &Output) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while text(output).is_empty() {
            assert!(std::time::Instant::now() < deadline, "nothing was written");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lines_written_together_go_out_in_one_write_in_order() {
        let output = Output::default();
        let (mut writer, guard) = start(output.clone(), NEVER);
        for i in 0..100 {
            writer.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text(&output), expected);
        assert_eq!(
            output.written.lock().unwrap().len(),
            1,
            "100 lines within one interval are one write"
        );
        assert_eq!(writer.dropped_lines(), 0);
    }

    #[test]
    fn access_lines_wait_for_their_batch_and_any_other_line_takes_them_out_at_once() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let output = Output::default();
        let (writer, guard) = start(output.clone(), NEVER);
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .without_time(),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "infermesh::access", "request one");
            tracing::info!(target: "infermesh::access", "request two");
            assert!(text(&output).is_empty(), "an access line went out alone");
            tracing::warn!("listening");
        });
        // The interval is an hour: only the urgent line can have sent them.
        wait_for_output(&output);
        let written = text(&output);
        let order: Vec<usize> = ["request one", "request two", "listening"]
            .iter()
            .map(|line| {
                written
                    .find(line)
                    .unwrap_or_else(|| panic!("{line}: {written}"))
            })
            .collect();
        assert!(order.is_sorted(), "{written}");
        assert_eq!(output.written.lock().unwrap().len(), 1, "one write");
        drop(guard);
    }

    #[test]
    fn a_line_is_written_within_the_interval_without_more_lines() {
        let output = Output::default();
        let (mut writer, _guard) = start(output.clone(), Duration::from_millis(10));
        writer.write_all(b"alone\n").unwrap();
        wait_for_output(&output);
        assert_eq!(text(&output), "alone\n");
    }

    #[test]
    fn lines_beyond_the_bound_are_dropped_and_counted_and_the_rest_kept() {
        let output = Output::default();
        output.hold(true);
        let (writer, guard) = start(output.clone(), NEVER);
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        // The batch the writer took before it stalled holds at most the
        // bound, and so does the buffer behind it: of twice the bound and
        // 100 lines more, at least 100 are dropped.
        let offered = (2 * MAX_PENDING_BYTES / line.len() + 100) as u64;
        for _ in 0..offered {
            writer.append(&line);
        }
        let dropped = writer.dropped_lines();
        assert!(dropped >= 100, "only {dropped} lines dropped");
        assert!(
            writer.shared.state().pending.len() <= MAX_PENDING_BYTES,
            "the buffer outgrew its bound"
        );
        output.hold(false);
        drop(guard);
        let written = lines_in(&output.written.lock().unwrap().concat());
        assert_eq!(written + dropped, offered, "every line kept was written");
    }

    #[test]
    fn a_failed_write_counts_its_lines_as_dropped() {
        let output = Output::default();
        output.fail.store(true, Ordering::Relaxed);
        let (mut writer, guard) = start(output.clone(), NEVER);
        writer.write_all(b"one\ntwo\n").unwrap();
        drop(guard);
        assert_eq!(writer.dropped_lines(), 2);
    }

    #[test]
    fn counts_lines_with_and_without_a_last_newline() {
        assert_eq!(lines_in(b""), 0);
        assert_eq!(lines_in(b"a\n"), 1);
        assert_eq!(lines_in(b"a\nb\n"), 2);
        assert_eq!(lines_in(b"a\nb"), 2);
    }
}
