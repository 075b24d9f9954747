//! Periodic promotion of good snapshots (evaluation gates, atomic `promoted/` pointer).

use serde::{Deserialize, Serialize};

/// `[promote]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PromoteConfig {
    /// Consider promotion every this many steps (0: never).
    pub every_steps: u64,
}

impl Default for PromoteConfig {
    fn default() -> Self {
        Self { every_steps: 0 }
    }
}
