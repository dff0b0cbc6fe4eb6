//! Log lines gathered in memory and written by a thread of their own.
//!
//! Every call logs its audit line. Written to stderr by the calling thread,
//! each line was a system call, and a wake-up of whatever reads the pipe, on
//! the request path. Here a line is a copy into a buffer under a lock; the
//! writer thread writes what has gathered every `interval`, at once when a
//! warning or an error arrives, and sooner when a batch's worth is waiting.
//! Nothing is dropped: when `limit` bytes wait, loggers wait for the writer,
//! as they would for a stderr that nobody reads.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// What the loggers and the writer thread share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer thread (a batch is ready, an urgent line, stop).
    wake: Condvar,
    /// Wakes loggers waiting for room.
    room: Condvar,
    batch: usize,
    limit: usize,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    urgent: bool,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A logger that panicked mid-copy leaves at worst a partial line.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Hands out writers to the fmt layer; cheap to clone.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread and writes what is left when dropped.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchWriter {
    /// Starts the writer thread over `sink`.
    pub fn start<W: Write + Send + 'static>(
        sink: W,
        interval: Duration,
        batch: usize,
        limit: usize,
    ) -> io::Result<(Self, Flusher)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            room: Condvar::new(),
            batch,
            limit,
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("weir-log".into())
            .spawn(move || write_batches(&for_thread, sink, interval))?;
        Ok((
            Self { shared: shared.clone() },
            Flusher {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

fn write_batches<W: Write>(shared: &Shared, mut sink: W, interval: Duration) {
    let mut batch = Vec::new();
    loop {
        let stop = {
            let mut state = shared.lock();
            if !state.stop && !state.urgent && state.pending.len() < shared.batch {
                state = shared
                    .wake
                    .wait_timeout(state, interval)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            state.urgent = false;
            // The two buffers trade places: each keeps its capacity.
            std::mem::swap(&mut state.pending, &mut batch);
            state.stop
        };
        shared.room.notify_all();
        if !batch.is_empty() {
            let stopping = || shared.lock().stop;
            write_out(&mut sink, &batch, &stopping, EXIT_WRITE_WAIT);
            batch.clear();
        }
        if stop {
            return;
        }
    }
}

/// Writes all of `batch`. A stderr that is a non-blocking pipe (one shared
/// with a supervisor that set it so) answers `WouldBlock` while full: that
/// is waited out, as a blocking pipe would make the write wait, not taken
/// as the end (the rest of the batch was dropped, and half a line glued to
/// the next batch's first); once the process is `stopping`, for at most
/// `exit_wait`, so that a pipe nobody reads any more does not hold the
/// exit. What is left unwritten is counted in
/// `weir_log_bytes_dropped_total`: where stderr is gone, there is nobody
/// left to tell.
fn write_out<W: Write>(sink: &mut W, batch: &[u8], stopping: &dyn Fn() -> bool, exit_wait: Duration) {
    let mut give_up = None;
    let mut full = || {
        std::thread::sleep(FULL_PIPE_WAIT);
        if !stopping() {
            return true;
        }
        let now = std::time::Instant::now();
        now < *give_up.get_or_insert(now + exit_wait)
    };
    let mut rest = batch;
    while !rest.is_empty() {
        match sink.write(rest) {
            Ok(0) => break,
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && full() => {}
            Err(_) => break,
        }
    }
    while let Err(e) = sink.flush() {
        if e.kind() != io::ErrorKind::WouldBlock || !full() {
            break;
        }
    }
    if !rest.is_empty() {
        crate::metrics::METRICS.log_bytes_dropped.inc_by(rest.len() as u64);
    }
}

/// Between tries of a write to a full non-blocking stderr.
const FULL_PIPE_WAIT: Duration = Duration::from_millis(5);
/// How long, once the process is stopping, a full non-blocking stderr is
/// waited for.
const EXIT_WRITE_WAIT: Duration = Duration::from_secs(1);

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One event's writer: the fmt layer writes each formatted line at once.
pub struct Line<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let shared = self.shared;
        let mut state = shared.lock();
        while state.pending.len() >= shared.limit && !state.stop {
            shared.wake.notify_one();
            state = shared.room.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        let before = state.pending.len();
        state.pending.extend_from_slice(buf);
        // Only the line that makes the writer due wakes it: a wake-up is a
        // system call, which is what this writer keeps off the logging thread.
        let wake = (self.urgent && !state.urgent) || (before < shared.batch && state.pending.len() >= shared.batch);
        state.urgent |= self.urgent;
        drop(state);
        if wake {
            shared.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BatchWriter {
    /// An urgent line is written at once (warnings and errors).
    fn line(&self, urgent: bool) -> Line<'_> {
        Line {
            shared: &self.shared,
            urgent,
        }
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        self.line(false)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line<'a> {
        self.line(*meta.level() <= Level::WARN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A sink the test can read, and that can be held shut.
    #[derive(Clone, Default)]
    struct Sink {
        written: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
        shut: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _open = self.shut.lock().expect("sink");
            self.written.lock().expect("sink").extend_from_slice(buf);
            *self.writes.lock().expect("sink") += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.written.lock().expect("sink").clone()).expect("utf-8")
        }
    }

    fn line(writer: &BatchWriter, text: &str) {
        writer.make_writer().write_all(text.as_bytes()).expect("write");
    }

    #[test]
    fn lines_are_written_in_order_in_few_writes_and_all_of_them_at_the_end() {
        let sink = Sink::default();
        let (writer, flusher) =
            BatchWriter::start(sink.clone(), Duration::from_secs(3600), 1 << 20, 1 << 24).expect("start");
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        for i in 0..1000 {
            line(&writer, &format!("line {i}\n"));
        }
        assert_eq!(sink.text(), "", "nothing is written before the interval or a batch");
        drop(flusher);
        assert_eq!(sink.text(), expected);
        assert_eq!(*sink.writes.lock().expect("sink"), 1, "one write for the whole batch");
    }

    #[test]
    fn warnings_and_full_batches_are_written_at_once() {
        let sink = Sink::default();
        let (writer, _flusher) =
            BatchWriter::start(sink.clone(), Duration::from_secs(3600), 64, 1 << 20).expect("start");
        let wait_for = |text: &str| {
            let started = Instant::now();
            while !sink.text().contains(text) {
                assert!(started.elapsed() < Duration::from_secs(5), "{text:?} not written");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        line(&writer, "info\n");
        writer.line(true).write_all(b"warning\n").expect("write");
        wait_for("info\nwarning\n");
        line(&writer, &"x".repeat(100));
        wait_for(&"x".repeat(100));
    }

    /// Takes at most 7 bytes a write, and is full (`WouldBlock`) every
    /// other time, as a non-blocking pipe read slowly is; then fails.
    struct Choppy {
        written: Vec<u8>,
        calls: usize,
        fail_after: usize,
    }

    impl Write for Choppy {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.written.len() >= self.fail_after {
                return Err(io::Error::other("stderr closed"));
            }
            if self.calls.is_multiple_of(2) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(7);
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_non_blocking_stderr_is_waited_for_and_a_failed_one_counted() {
        let batch: Vec<u8> = (0..100).flat_map(|i| format!("line {i:03}\n").into_bytes()).collect();
        let mut pipe = Choppy {
            written: Vec::new(),
            calls: 0,
            fail_after: usize::MAX,
        };
        write_out(&mut pipe, &batch, &|| false, EXIT_WRITE_WAIT);
        assert_eq!(pipe.written, batch);
        let dropped = || crate::metrics::METRICS.log_bytes_dropped.get();
        let before = dropped();
        let mut gone = Choppy {
            written: Vec::new(),
            calls: 0,
            fail_after: 70,
        };
        write_out(&mut gone, &batch, &|| false, EXIT_WRITE_WAIT);
        assert_eq!(dropped() - before, (batch.len() - gone.written.len()) as u64);
        // Once stopping, one that stays full is given up on after the wait.
        let mut stuck = Choppy {
            written: Vec::new(),
            calls: 1,
            fail_after: usize::MAX,
        };
        let before = dropped();
        write_out(&mut stuck, &batch, &|| true, Duration::from_millis(50));
        assert_eq!(dropped() - before, (batch.len() - stuck.written.len()) as u64);
        assert!(stuck.written.len() < batch.len());
    }

    #[test]
    fn a_full_buffer_makes_loggers_wait_and_loses_nothing() {
        let sink = Sink::default();
        let shut = sink.shut.clone();
        let held = shut.lock().expect("sink");
        let (writer, flusher) = BatchWriter::start(sink.clone(), Duration::from_millis(1), 10, 100).expect("start");
        let logger = {
            let writer = writer.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    line(&writer, &format!("{i:09}\n"));
                }
            })
        };
        // The writer thread is stuck in the sink: the logger fills the buffer and waits.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!logger.is_finished(), "the logger waits for room");
        drop(held);
        logger.join().expect("logger");
        drop(flusher);
        let expected: String = (0..100).map(|i| format!("{i:09}\n")).collect();
        assert_eq!(sink.text(), expected);
    }
}
