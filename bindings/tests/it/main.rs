//! The bindings against the real contract on a real anvil.

mod deploy_script;
mod registry;
