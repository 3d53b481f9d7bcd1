//! Progress bars on stderr for the library's [`tq_report::Progress`] stages.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

/// One bar at a time, replaced at each stage.
pub struct Bars(Mutex<Option<ProgressBar>>);

impl Bars {
    /// No bar yet.
    pub fn new() -> Self {
        Self(Mutex::new(None))
    }
    fn with(&self, f: impl FnOnce(&ProgressBar)) {
        if let Ok(g) = self.0.lock() {
            if let Some(pb) = g.as_ref() {
                f(pb);
            }
        }
    }
}

impl tq_report::Progress for Bars {
    fn stage(&self, what: &str, total: u64, unit: &str) {
        let pb = if total == 0 { ProgressBar::new_spinner() } else { ProgressBar::new(total) };
        let template =
            if total == 0 { format!("{what} {{spinner}} {{elapsed}}") } else { format!("{what} {{msg:24}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{eta}})") };
        pb.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
        if let Ok(mut g) = self.0.lock() {
            if let Some(old) = g.replace(pb) {
                old.finish_and_clear();
            }
        }
    }
    fn message(&self, msg: &str) {
        let msg = msg.to_string();
        self.with(|pb| pb.set_message(msg));
    }
    fn inc(&self, k: u64) {
        self.with(|pb| pb.inc(k));
    }
    fn set(&self, done: u64) {
        self.with(|pb| pb.set_position(done));
    }
    fn finish(&self) {
        if let Ok(mut g) = self.0.lock() {
            if let Some(pb) = g.take() {
                pb.finish_and_clear();
            }
        }
    }
}
