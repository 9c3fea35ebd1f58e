//! The running sums of an epoch in progress. They are what makes a checkpoint written in the middle
//! of an epoch (on Ctrl-C) resume exactly: the resumed run skips the batches already done (the
//! loader's order is a pure function of seed and epoch) and carries on adding to the same sums, so
//! the epoch's loss, accuracy and mean norm M — and so δ of the next epoch — come out as if the run
//! had never stopped.

use serde::{Deserialize, Serialize};

/// Key of the tally in `TrainState::extra`; absent in a checkpoint written at the end of an epoch.
pub const EXTRA_KEY: &str = "partial_epoch";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochTally {
    /// Index of the next batch to train on (= batches done, including skipped single-image ones).
    pub next_batch: usize,
    /// Σ batch loss × batch size.
    pub loss_sum: f64,
    /// Images trained on.
    pub seen: usize,
    /// Of those, classified correctly.
    pub correct: usize,
    /// Σ of the norms the δ schedule averages (`loss::delta_norm_sum`).
    pub norm_sum: f64,
    /// Seconds spent training this epoch so far (for images/s; not part of the exact state).
    pub train_time_s: f64,
}

impl EpochTally {
    /// The tally stored in a checkpoint's extra state, if the checkpoint was written mid-epoch.
    pub fn from_extra(
        extra: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> anyhow::Result<Option<EpochTally>> {
        match extra.get(EXTRA_KEY) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                anyhow::anyhow!(
                    "the checkpoint's `{EXTRA_KEY}` state is not valid ({e}); the checkpoint is \
                     corrupted"
                )
            }),
        }
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("an EpochTally always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_checkpoint_extra_exactly() {
        let t = EpochTally {
            next_batch: 7,
            loss_sum: 0.1 + 0.2,
            seen: 224,
            correct: 31,
            norm_sum: 1_234.567_890_123_456_7,
            train_time_s: 3.5,
        };
        let mut extra = std::collections::BTreeMap::new();
        assert_eq!(EpochTally::from_extra(&extra).unwrap(), None);
        extra.insert(EXTRA_KEY.to_string(), t.to_value());
        // Through the JSON text, as the checkpoint metadata stores it.
        let text = serde_json::to_string(&extra).unwrap();
        let back: std::collections::BTreeMap<String, serde_json::Value> =
            serde_json::from_str(&text).unwrap();
        assert_eq!(EpochTally::from_extra(&back).unwrap(), Some(t));
        extra.insert(
            EXTRA_KEY.to_string(),
            serde_json::json!({"next_batch": "x"}),
        );
        assert!(EpochTally::from_extra(&extra).is_err());
    }
}
