//! Gradient accumulation and the sum across ranks, as the step loop drives them.
//!
//! Each micro-batch's gradient is computed from zero and added, in micro-batch order, into an
//! accumulator (`Backend::accumulate`), so one process with W micro-batches sums exactly what
//! W ranks with one micro-batch each sum in the collective's rank-order all-reduce. On the last
//! micro-batch of a step the model's backward pass tells a [`GradHook`] as each bucket of
//! gradients becomes final (layers last to first, then embeddings and final layernorm); the
//! hook adds the bucket into the accumulator and starts its all-reduce at once, so the sum
//! overlaps the rest of the backward pass (NCCL runs it on its own stream).

use super::Result;
use crate::backend::{Backend, Role};
use crate::dist::{Collective, DistError};
use crate::model::{Gpt, GradHook, ModelError};
use std::cell::RefCell;
use std::rc::Rc;

/// What the hook shares with the loop.
struct State<B: Backend> {
    comm: Rc<dyn Collective<B>>,
    /// The sum of the step's earlier micro-batches' gradients (`None` with one micro-batch);
    /// like the model's, `None` per frozen tensor.
    acc: Option<Vec<Option<B::Buf>>>,
    /// Which parameters' all-reduce has started this step.
    reduced: Vec<bool>,
    /// The collective's error, kept typed (the hook can only return a model error).
    failed: Option<DistError>,
}

impl<B: Backend> State<B> {
    /// Adds bucket `bucket` of `grads` into the accumulator (if any) and starts its all-reduce.
    fn ready(&mut self, be: &B, grads: &mut [Option<B::Buf>], bucket: &[usize]) -> Result<()> {
        if let Some(&i) = bucket.iter().find(|&&i| self.reduced[i]) {
            return Err(ModelError::Invalid(format!(
                "gradient {i} was reported final twice in one step: the objective ran more than \
                 one backward pass in its last micro-batch"
            ))
            .into());
        }
        let target = match &mut self.acc {
            Some(acc) => {
                for &i in bucket {
                    if let (Some(a), Some(g)) = (acc[i].as_mut(), grads[i].as_ref()) {
                        be.accumulate(a, g)?;
                    }
                }
                acc.as_mut_slice()
            }
            None => grads,
        };
        // Buckets hold trained tensors only (GradHook), each with its gradient.
        let mut bufs: Vec<&mut B::Buf> = pick_mut(target, bucket)
            .into_iter()
            .map(|g| g.as_mut().expect("a bucket holds trained tensors"))
            .collect();
        self.comm.all_reduce_sum(be, &mut bufs)?;
        for &i in bucket {
            self.reduced[i] = true;
        }
        Ok(())
    }
}

/// The hook the model holds during a step's last micro-batch.
struct Hook<B: Backend>(Rc<RefCell<State<B>>>);

impl<B: Backend> GradHook<B> for Hook<B> {
    fn ready(
        &mut self,
        be: &B,
        grads: &mut [Option<B::Buf>],
        bucket: &[usize],
    ) -> crate::model::Result<()> {
        let mut s = self.0.borrow_mut();
        match s.ready(be, grads, bucket) {
            Ok(()) => Ok(()),
            Err(super::TrainError::Dist(e)) => {
                let msg = e.to_string();
                s.failed = Some(e);
                Err(ModelError::Invalid(msg))
            }
            Err(super::TrainError::Model(e)) => Err(e),
            Err(super::TrainError::Backend(e)) => Err(e.into()),
            Err(e) => Err(ModelError::Invalid(e.to_string())),
        }
    }
}

/// One step's gradient accumulation and all-reduce over `accum` local micro-batches.
pub(super) struct GradSync<B: Backend> {
    state: Rc<RefCell<State<B>>>,
    accum: usize,
}

impl<B: Backend + 'static> GradSync<B> {
    pub(super) fn new(comm: Rc<dyn Collective<B>>, accum: usize, n_params: usize) -> Self {
        Self {
            state: Rc::new(RefCell::new(State {
                comm,
                acc: None,
                reduced: vec![false; n_params],
                failed: None,
            })),
            accum,
        }
    }

    /// Runs micro-batch `k` of the step (0-based) with `micro`, which adds its gradient into
    /// the model's zeroed gradients; after the last, the model holds the sum over every
    /// micro-batch of every rank (once [`Collective::wait`] returns).
    pub(super) fn micro_batch<T>(
        &mut self,
        be: &B,
        model: &mut Gpt<B>,
        k: usize,
        micro: impl FnOnce(&mut Gpt<B>) -> Result<T>,
    ) -> Result<T> {
        let last = k + 1 == self.accum;
        if k == 0 {
            let mut s = self.state.borrow_mut();
            s.reduced.iter_mut().for_each(|r| *r = false);
            s.failed = None;
        }
        model.zero_grad(be)?;
        if !last {
            let out = micro(model)?;
            let mut s = self.state.borrow_mut();
            match &mut s.acc {
                Some(acc) if k > 0 => {
                    let pairs = acc.iter_mut().zip(&model.grads);
                    for (a, g) in pairs.filter_map(|(a, g)| a.as_mut().zip(g.as_ref())) {
                        be.accumulate(a, g)?;
                    }
                }
                // The first micro-batch's gradient is the accumulator as it is.
                acc => {
                    if acc.is_none() {
                        let zeros = model
                            .grads
                            .iter()
                            .map(|g| g.as_ref().map(|g| be.zeros(be.len(g), Role::Grad)))
                            .map(Option::transpose)
                            .collect::<std::result::Result<Vec<_>, _>>()?;
                        *acc = Some(zeros);
                    }
                    std::mem::swap(acc.as_mut().expect("set above"), &mut model.grads);
                }
            }
            return Ok(out);
        }
        let accumulating = self.accum > 1;
        model.set_grad_hook(Some(Box::new(Hook(self.state.clone()))));
        let out = micro(model);
        model.set_grad_hook(None);
        let mut s = self.state.borrow_mut();
        if let Some(e) = s.failed.take() {
            return Err(e.into());
        }
        let out = out?;
        // A micro-batch with nothing to learn from runs no backward pass (and tells no hook):
        // its buckets are reduced here, in the same order, so every rank makes the same calls.
        for bucket in model.grad_buckets() {
            if !bucket.iter().any(|&i| s.reduced[i]) {
                s.ready(be, &mut model.grads, &bucket)?;
            }
        }
        if accumulating {
            std::mem::swap(
                s.acc.as_mut().expect("set by micro-batch 0"),
                &mut model.grads,
            );
        }
        Ok(out)
    }

    /// Waits until the all-reduce of every bucket has finished.
    pub(super) fn wait(&self, be: &B) -> Result<()> {
        Ok(self.state.borrow().comm.wait(be)?)
    }
}

/// Mutable references to `v[i]` for each (distinct) `i` in `idx`, in `idx`'s order.
fn pick_mut<'a, T>(v: &'a mut [T], idx: &[usize]) -> Vec<&'a mut T> {
    let mut slots: Vec<Option<&'a mut T>> = v.iter_mut().map(Some).collect();
    idx.iter()
        .map(|&i| slots[i].take().expect("distinct indices"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::pick_mut;

    #[test]
    fn pick_mut_keeps_the_order_asked() {
        let mut v = vec![10, 11, 12, 13];
        let got: Vec<i32> = pick_mut(&mut v, &[3, 0, 2])
            .into_iter()
            .map(|x| *x)
            .collect();
        assert_eq!(got, vec![13, 10, 12]);
    }
}
