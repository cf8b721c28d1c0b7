//! `topcoat demo`: the three rounds of training on the embedded demo data, measured.

pub mod card;
pub use card::ReportCard;
