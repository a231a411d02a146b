//! The registry's `State` enum as a Rust enum.
//!
//! A JSON ABI records an enum only as `uint8` (its variants are not in the ABI), so `sol!`
//! expands `IServiceRegistry.State` to a `uint8` wrapper. [`ServiceState`] gives it its
//! variants back and rejects values the contract never writes, so a bad value read from
//! a chain is an error, not a wrong state.

use std::fmt;
use std::str::FromStr;

use crate::IServiceRegistry::State;

/// Life-cycle state of a service, as `IServiceRegistry.State` declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceState {
    /// Not registered.
    None,
    /// Registered, not yet (or no longer known to be) serving.
    Registered,
    /// Serving.
    Running,
    /// The manager is redeploying it.
    Recovering,
    /// Stopped on purpose by its manager.
    Stopped,
}

/// A state value the contract does not define.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown service state {0} (the registry defines 0..=4: none, registered, running, recovering, stopped)")]
pub struct UnknownState(pub u8);

impl ServiceState {
    /// Every state, in the contract's declaration order (index = ABI value).
    pub const ALL: [Self; 5] = [Self::None, Self::Registered, Self::Running, Self::Recovering, Self::Stopped];

    /// The lower-case name used on the command line and in JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Registered => "registered",
            Self::Running => "running",
            Self::Recovering => "recovering",
            Self::Stopped => "stopped",
        }
    }

    /// The ABI value.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }
}

impl TryFrom<u8> for ServiceState {
    type Error = UnknownState;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        Self::ALL.get(usize::from(value)).copied().ok_or(UnknownState(value))
    }
}

impl TryFrom<State> for ServiceState {
    type Error = UnknownState;

    fn try_from(value: State) -> Result<Self, Self::Error> {
        Self::try_from(value.into_underlying())
    }
}

impl From<ServiceState> for State {
    fn from(value: ServiceState) -> Self {
        Self::from(value.as_u8())
    }
}

impl From<ServiceState> for u8 {
    fn from(value: ServiceState) -> Self {
        value.as_u8()
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|state| state.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
            format!("unknown state {s:?}: expected one of registered, running, recovering, stopped (or none)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variants, in order, of `enum State` in the Solidity interface.
    fn solidity_variants() -> Vec<String> {
        let source = include_str!("../../contracts/interfaces/IServiceRegistry.sol");
        let start = source.find("enum State {").expect("IServiceRegistry declares enum State") + "enum State {".len();
        let end = start + source[start..].find('}').expect("enum State is closed");
        source[start..end].split(',').map(|v| v.trim().to_ascii_lowercase()).filter(|v| !v.is_empty()).collect()
    }

    #[test]
    fn matches_the_solidity_declaration() {
        let names: Vec<String> = ServiceState::ALL.iter().map(|s| s.as_str().to_owned()).collect();
        assert_eq!(names, solidity_variants(), "ServiceState has drifted from IServiceRegistry.State");
    }

    #[test]
    fn round_trips_through_the_abi_value_and_the_name() {
        for state in ServiceState::ALL {
            assert_eq!(ServiceState::try_from(State::from(state)), Ok(state));
            assert_eq!(state.as_str().parse::<ServiceState>(), Ok(state));
        }
        assert_eq!("RUNNING".parse::<ServiceState>(), Ok(ServiceState::Running));
    }

    #[test]
    fn rejects_values_the_contract_never_writes() {
        assert_eq!(ServiceState::try_from(5u8), Err(UnknownState(5)));
        assert_eq!(ServiceState::try_from(State::from(255u8)), Err(UnknownState(255)));
        assert!("paused".parse::<ServiceState>().unwrap_err().contains("expected one of"));
    }
}
