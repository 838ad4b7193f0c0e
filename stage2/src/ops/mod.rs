//! The implementations behind [`crate::Stage2Table`]'s operations.

pub(crate) mod leaf;
pub(crate) mod map;
pub(crate) mod protect;
pub(crate) mod split;
pub(crate) mod unmap;
pub(crate) mod walk;
