//! The fixtures against the real programs they start.

mod anvil;
