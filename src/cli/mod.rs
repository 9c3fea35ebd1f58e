//! The `podgpu` command line: one file per subcommand, each with its clap `Args` and a `run`.

pub mod compare;
pub mod data;
pub mod device;
pub mod eval;
pub mod fidelity;
pub mod models;
pub mod pedcc;
pub mod train;
pub mod visualize;

/// Makes a closed standard output end the process quietly, as Unix tools do (a report piped into
/// `head`), instead of a "failed printing to stdout" panic: Rust ignores SIGPIPE, this restores its
/// default. Call first thing in `main`, before any other thread exists; not for training, where a
/// closed output must not kill a run between two checkpoints.
pub fn end_quietly_when_output_closes() {
    #[cfg(unix)]
    // SAFETY: setting a signal disposition before any other thread exists (the caller's promise).
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The text after `error: ` for a failed command: the messages of the error's chain joined by ": ",
/// leaving out a cause whose text the line already holds (decoders repeat their cause inside their
/// own message, e.g. the image crate's "Format error decoding Png: X" whose source is X), so that
/// every cause is said once.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let m = cause.to_string();
        let m = m.trim();
        if m.is_empty() || out.contains(m) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(m);
    }
    out
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Decoder(&'static str);
    impl std::fmt::Display for Decoder {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Format error decoding Png: {}", self.0)
        }
    }
    impl std::error::Error for Decoder {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&Inner)
        }
    }
    #[derive(Debug)]
    struct Inner;
    impl std::fmt::Display for Inner {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("IDAT chunk is short")
        }
    }
    impl std::error::Error for Inner {}

    #[test]
    fn each_cause_is_said_once() {
        let e =
            anyhow::Error::new(Decoder("IDAT chunk is short")).context("cannot decode image x.png");
        assert_eq!(
            super::error_text(&e),
            "cannot decode image x.png: Format error decoding Png: IDAT chunk is short"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_text(&e), "outer: inner");
    }
}
