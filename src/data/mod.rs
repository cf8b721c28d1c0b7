//! (placeholder until the data layer lands)
use thiserror::Error;
#[derive(Debug, Error)]
pub enum DataError { #[error("{0}")] Other(String) }
pub struct Tokenizer;
impl Tokenizer {
    pub fn save(&self, _p: &std::path::Path) -> Result<(), DataError> { Ok(()) }
    pub fn load(_p: &std::path::Path) -> Result<Tokenizer, DataError> { Ok(Tokenizer) }
}
