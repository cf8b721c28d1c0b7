//! `topcoat demo`: the three rounds of training on the embedded demo data, measured.

pub mod card;
pub use card::ReportCard;
pub mod table; // the card as Markdown tables (rounds, stage timings, samples)
