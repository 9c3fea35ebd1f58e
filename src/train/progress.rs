//! Progress of one epoch: an indicatif bar (images/s, loss, ETA) on a terminal, plain periodic lines
//! when stderr is not one (logs, CI, `nohup`), so that log files stay readable.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, else plain lines every 10 s.
    Auto,
    /// Always the bar.
    Bar,
    /// A line on stderr when `every` has passed since the last one, or `every_batches` batches
    /// (0: by time only).
    Plain {
        every: Duration,
        every_batches: usize,
    },
    /// Nothing at all, not even the final line.
    Off,
}

enum Output {
    Bar(ProgressBar),
    Plain {
        every: Duration,
        every_batches: usize,
        last_time: Instant,
        last_batch: usize,
    },
    Off,
}

pub struct Progress {
    total_batches: usize,
    epoch: usize,
    epochs: usize,
    start: Instant,
    images: u64,
    loss_sum: f64,
    losses: usize,
    /// The epoch's mean loss as last read (`show_loss`); replaces the mean of `update`'s losses.
    shown_loss: Option<f64>,
    out: Output,
}

impl Progress {
    /// Progress of epoch `epoch` (as shown to the user, 1-based) of `epochs`, `total_batches` long.
    pub fn new(total_batches: usize, epoch: usize, epochs: usize) -> Progress {
        Progress::with_mode(total_batches, epoch, epochs, ProgressMode::Auto)
    }

    pub fn with_mode(
        total_batches: usize,
        epoch: usize,
        epochs: usize,
        mode: ProgressMode,
    ) -> Progress {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Plain {
                every: Duration::from_secs(10),
                every_batches: 0,
            },
            m => m,
        };
        let now = Instant::now();
        let out = match mode {
            ProgressMode::Bar => {
                let bar = ProgressBar::with_draw_target(
                    Some(total_batches as u64),
                    ProgressDrawTarget::stderr(),
                );
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{wide_bar:.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(format!("epoch {epoch}/{epochs}"));
                Output::Bar(bar)
            }
            ProgressMode::Plain {
                every,
                every_batches,
            } => Output::Plain {
                every,
                every_batches,
                last_time: now,
                last_batch: 0,
            },
            ProgressMode::Off | ProgressMode::Auto => Output::Off,
        };
        Progress {
            total_batches,
            epoch,
            epochs,
            start: now,
            images: 0,
            loss_sum: 0.0,
            losses: 0,
            shown_loss: None,
            out,
        }
    }

    /// Batch `batch_idx` (0-based) is done: it held `images` images and had loss `loss`.
    pub fn update(&mut self, batch_idx: usize, images: usize, loss: f64) {
        self.images += images as u64;
        if loss.is_finite() {
            self.loss_sum += loss;
            self.losses += 1;
        }
        let done = batch_idx + 1;
        let elapsed = self.start.elapsed().as_secs_f64();
        let mean_loss = self.mean_loss();
        match &mut self.out {
            Output::Bar(bar) => {
                bar.set_position(done as u64);
                bar.set_message(format!(
                    "{:.0} img/s  loss {}",
                    rate(self.images, elapsed),
                    loss_text(mean_loss)
                ));
            }
            Output::Plain {
                every,
                every_batches,
                last_time,
                last_batch,
            } => {
                let by_batches = *every_batches > 0 && done - *last_batch >= *every_batches;
                if by_batches || last_time.elapsed() >= *every {
                    *last_time = Instant::now();
                    *last_batch = done;
                    eprintln!(
                        "{}",
                        status_line(
                            self.epoch,
                            self.epochs,
                            done,
                            self.total_batches,
                            self.images,
                            elapsed,
                            mean_loss
                        )
                    );
                }
            }
            Output::Off => {}
        }
    }

    /// Batch `batch_idx` (0-based) of `images` images is done, its loss not known yet (the trainer
    /// reads losses every few steps and passes them to `show_loss`).
    pub fn advance(&mut self, batch_idx: usize, images: usize) {
        self.update(batch_idx, images, f64::NAN);
    }

    /// The epoch's mean loss so far, as last read: what the line shows from now on.
    pub fn show_loss(&mut self, mean_loss: f64) {
        self.shown_loss = Some(mean_loss);
    }

    /// The loss the line shows: the last `show_loss`, else the mean over the epoch's batches so far
    /// (NaN before the first finite one).
    pub fn mean_loss(&self) -> f64 {
        if let Some(l) = self.shown_loss {
            return l;
        }
        if self.losses == 0 {
            f64::NAN
        } else {
            self.loss_sum / self.losses as f64
        }
    }

    /// Images seen this epoch so far.
    pub fn images(&self) -> u64 {
        self.images
    }

    /// Removes the bar and prints the epoch's summary line on stdout.
    pub fn finish(self, line: &str) {
        match self.out {
            Output::Bar(bar) => {
                bar.finish_and_clear();
                println!("{line}");
            }
            Output::Plain { .. } => println!("{line}"),
            Output::Off => {}
        }
    }
}

fn rate(images: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        images as f64 / secs
    } else {
        0.0
    }
}

fn loss_text(loss: f64) -> String {
    if loss.is_nan() {
        "-".into()
    } else {
        format!("{loss:.4}")
    }
}

/// The plain progress line: `epoch 3/100  batch 120/391 (31%)  1234 img/s  loss 1.2345  ETA 2:42`.
pub fn status_line(
    epoch: usize,
    epochs: usize,
    done: usize,
    total: usize,
    images: u64,
    elapsed_s: f64,
    mean_loss: f64,
) -> String {
    let pct = (100 * done).checked_div(total).unwrap_or(100);
    let eta = if done > 0 && total >= done {
        format_duration(elapsed_s / done as f64 * (total - done) as f64)
    } else {
        "-".into()
    };
    format!(
        "epoch {epoch}/{epochs}  batch {done}/{total} ({pct}%)  {:.0} img/s  loss {}  ETA {eta}",
        rate(images, elapsed_s),
        loss_text(mean_loss)
    )
}

/// `m:ss`, or `h:mm:ss` from an hour on.
pub fn format_duration(secs: f64) -> String {
    let s = if secs.is_finite() && secs > 0.0 {
        secs.round() as u64
    } else {
        0
    };
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_clock_times() {
        assert_eq!(format_duration(0.0), "0:00");
        assert_eq!(format_duration(59.4), "0:59");
        assert_eq!(format_duration(61.0), "1:01");
        assert_eq!(format_duration(3600.0 + 62.0), "1:01:02");
        assert_eq!(format_duration(f64::NAN), "0:00");
    }

    #[test]
    fn status_line_has_rate_loss_and_eta() {
        // 100 of 400 batches of 128 images in 10 s: 1280 img/s, 30 s to go.
        let line = status_line(3, 100, 100, 400, 12_800, 10.0, 1.23456);
        assert_eq!(
            line,
            "epoch 3/100  batch 100/400 (25%)  1280 img/s  loss 1.2346  ETA 0:30"
        );
        assert!(status_line(1, 1, 0, 5, 0, 0.0, f64::NAN).contains("loss -  ETA -"));
    }

    #[test]
    fn mean_loss_skips_non_finite_batches() {
        let mut p = Progress::with_mode(3, 1, 1, ProgressMode::Off);
        p.update(0, 4, 2.0);
        p.update(1, 4, f64::NAN);
        p.update(2, 4, 4.0);
        assert_eq!(p.mean_loss(), 3.0);
        assert_eq!(p.images(), 12);
    }

    #[test]
    fn a_shown_loss_replaces_the_batch_mean() {
        let mut p = Progress::with_mode(3, 1, 1, ProgressMode::Off);
        p.advance(0, 4);
        assert!(p.mean_loss().is_nan());
        p.advance(1, 4);
        p.show_loss(1.5);
        p.advance(2, 4);
        assert_eq!(p.mean_loss(), 1.5);
        assert_eq!(p.images(), 12);
    }
}
