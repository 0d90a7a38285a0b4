//! Progress reporting for long builds: step lines with elapsed times, and the output of
//! chatty tools (debootstrap's `I: …` lines) streamed as it comes.
//!
//! The builder calls a [`Progress`] implementation; [`ConsoleProgress`] prints to stderr,
//! [`NoProgress`] discards. A [`Step`] guard reports its end exactly once, as failed if it
//! is dropped unfinished (an early `?` return).

use std::io::Write;
use std::time::{Duration, Instant};

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// The work was done.
    Done,
    /// Up to date: nothing was redone.
    Cached,
    /// It failed (the error follows separately).
    Failed,
}

/// Receives build progress. Called from async tasks; keep it cheap.
pub trait Progress: Send + Sync {
    /// A step starts.
    fn step_started(&self, step: &str);
    /// A line of tool output inside a step.
    fn step_output(&self, step: &str, line: &str);
    /// A step ended.
    fn step_finished(&self, step: &str, elapsed: Duration, outcome: StepOutcome);
}

/// Discards progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn step_started(&self, _: &str) {}
    fn step_output(&self, _: &str, _: &str) {}
    fn step_finished(&self, _: &str, _: Duration, _: StepOutcome) {}
}

/// Prints progress to stderr:
///
/// ```text
/// ==> debootstrap minbase bookworm
///     I: Retrieving InRelease
/// ==> debootstrap minbase bookworm: done in 41.2s
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct ConsoleProgress;

impl Progress for ConsoleProgress {
    fn step_started(&self, step: &str) {
        let _ = writeln!(std::io::stderr().lock(), "==> {step}");
    }

    fn step_output(&self, _step: &str, line: &str) {
        let _ = writeln!(std::io::stderr().lock(), "    {line}");
    }

    fn step_finished(&self, step: &str, elapsed: Duration, outcome: StepOutcome) {
        let what = match outcome {
            StepOutcome::Done => "done",
            StepOutcome::Cached => "up to date",
            StepOutcome::Failed => "FAILED",
        };
        let _ = writeln!(
            std::io::stderr().lock(),
            "==> {step}: {what} in {:.1}s",
            elapsed.as_secs_f64()
        );
    }
}

/// One running step. Report the end with [`Step::done`] or [`Step::cached`]; dropping it
/// unfinished reports a failure.
pub struct Step<'a> {
    progress: &'a dyn Progress,
    name: String,
    started: Instant,
    finished: bool,
}

impl<'a> Step<'a> {
    /// Starts a step.
    pub fn start(progress: &'a dyn Progress, name: impl Into<String>) -> Self {
        let name = name.into();
        progress.step_started(&name);
        tracing::debug!(step = %name, "step started");
        Self {
            progress,
            name,
            started: Instant::now(),
            finished: false,
        }
    }

    /// A tool output line.
    pub fn output(&self, line: &str) {
        self.progress.step_output(&self.name, line);
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Ends the step: work done.
    pub fn done(mut self) {
        self.finish(StepOutcome::Done);
    }

    /// Ends the step: nothing to do.
    pub fn cached(mut self) {
        self.finish(StepOutcome::Cached);
    }

    fn finish(&mut self, outcome: StepOutcome) {
        if !self.finished {
            self.finished = true;
            let elapsed = self.started.elapsed();
            tracing::debug!(step = %self.name, ?elapsed, ?outcome, "step finished");
            self.progress.step_finished(&self.name, elapsed, outcome);
        }
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        self.finish(StepOutcome::Failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Progress for Recorder {
        fn step_started(&self, step: &str) {
            self.0.lock().unwrap().push(format!("start {step}"));
        }
        fn step_output(&self, step: &str, line: &str) {
            self.0.lock().unwrap().push(format!("out {step} {line}"));
        }
        fn step_finished(&self, step: &str, _: Duration, outcome: StepOutcome) {
            self.0
                .lock()
                .unwrap()
                .push(format!("end {step} {outcome:?}"));
        }
    }

    #[test]
    fn steps_report_once_and_failures_on_drop() {
        let rec = Recorder::default();
        let s = Step::start(&rec, "a");
        s.output("I: x");
        s.done();
        drop(Step::start(&rec, "b"));
        Step::start(&rec, "c").cached();
        assert_eq!(
            *rec.0.lock().unwrap(),
            [
                "start a",
                "out a I: x",
                "end a Done",
                "start b",
                "end b Failed",
                "start c",
                "end c Cached"
            ]
        );
    }
}
