//! Packed batches: several whole examples laid end to end in each row of a batch, kept apart.
//!
//! In a packed row every example sees only itself: its position embeddings restart at 0 and its
//! tokens attend only to earlier tokens of the same example. The model passes the explicit
//! positions to the encoder and the example starts to attention (see `Backend::encoder_forward`
//! and `Backend::attention_forward`), so a packed batch gives each example exactly the logits
//! it would get alone in a row. The tail of a row that no example fills (padding) is one more
//! segment of its own.

use super::{ModelError, Result};
use crate::backend::Backend;

/// How the examples of a `[B, T]` batch are packed into its rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    b: usize,
    t: usize,
    /// `[B*T]` position of each token within its example.
    positions: Vec<i32>,
    /// `[B*T]` position within the row where each token's example begins.
    starts: Vec<i32>,
}

impl Packing {
    /// `lengths[r]` lists the token counts of the examples packed into row `r`, in row order;
    /// they may fill at most `t` positions (the rest is padding). Zero lengths are ignored.
    pub fn from_lengths(lengths: &[Vec<usize>], t: usize) -> Result<Self> {
        let b = lengths.len();
        if t == 0 || i32::try_from(t).is_err() {
            return Err(ModelError::Invalid(format!(
                "packing: row length T = {t} must be in [1, 2^31)"
            )));
        }
        let (mut positions, mut starts) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for (r, row) in lengths.iter().enumerate() {
            let used: usize = row.iter().sum();
            if used > t {
                return Err(ModelError::Invalid(format!(
                    "packing: row {r} holds examples of {used} tokens in all, more than T = {t}"
                )));
            }
            let mut begin = 0;
            for &len in row.iter().chain(std::iter::once(&(t - used))) {
                for p in 0..len {
                    positions.push(p as i32);
                    starts.push(begin as i32);
                }
                begin += len;
            }
        }
        Ok(Self {
            b,
            t,
            positions,
            starts,
        })
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.b
    }

    /// Positions per row.
    pub fn row_len(&self) -> usize {
        self.t
    }

    /// `[B*T]` position of each token within its example (what the encoder adds `wpe` for).
    pub fn positions(&self) -> &[i32] {
        &self.positions
    }

    /// `[B*T]` where each token's example begins within its row (attention's `starts`).
    pub fn starts(&self) -> &[i32] {
        &self.starts
    }

    /// Errors unless this packing is for a `[b, t]` batch.
    pub(super) fn check_shape(&self, b: usize, t: usize) -> Result<()> {
        if (self.b, self.t) != (b, t) {
            return Err(ModelError::Invalid(format!(
                "packing is for a [{}, {}] batch, the batch is [{b}, {t}]",
                self.b, self.t
            )));
        }
        Ok(())
    }
}

/// A [`Packing`] on the device, kept from a forward pass for its backward pass.
pub(super) struct PackedIds<B: Backend> {
    pub positions: B::Ids,
    pub starts: B::Ids,
}

impl<B: Backend> PackedIds<B> {
    pub fn upload(be: &B, p: &Packing) -> Result<Self> {
        Ok(Self {
            positions: be.upload_ids(&p.positions)?,
            starts: be.upload_ids(&p.starts)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_restart_per_example_and_padding_is_its_own_segment() {
        let p = Packing::from_lengths(&[vec![2, 3], vec![6], vec![]], 6).unwrap();
        assert_eq!((p.rows(), p.row_len()), (3, 6));
        #[rustfmt::skip]
        assert_eq!(p.positions(), &[0, 1, 0, 1, 2, 0,  0, 1, 2, 3, 4, 5,  0, 1, 2, 3, 4, 5]);
        #[rustfmt::skip]
        assert_eq!(p.starts(), &[0, 0, 2, 2, 2, 5,  0, 0, 0, 0, 0, 0,  0, 0, 0, 0, 0, 0]);
        assert!(p.check_shape(3, 6).is_ok());
        assert!(p.check_shape(3, 7).is_err());
    }

    #[test]
    fn an_overfull_row_is_an_error_naming_it() {
        let e = Packing::from_lengths(&[vec![3], vec![4, 3]], 6).unwrap_err();
        assert!(
            e.to_string().contains("row 1 holds examples of 7 tokens"),
            "{e}"
        );
    }
}
