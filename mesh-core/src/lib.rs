//! placeholder
pub mod clock;
pub mod crypto;
pub mod identity;
