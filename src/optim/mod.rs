//! Optimisers and learning-rate schedules (DESIGN.md §1.7): SGD with momentum and weight decay,
//! stepped ×γ at fixed epochs.

mod schedule;
mod sgd;

pub use schedule::StepSchedule;
pub use sgd::{sgd_update, Sgd, SgdState, SkipIf};
