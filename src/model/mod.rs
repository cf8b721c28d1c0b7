//! GPT-2: parameter layout, activations, and forward/backward written once against `Backend`.

pub mod params;

pub use params::{Init, LayerIdx, ParamLayout, ParamSpec};
