//! Named parameters and buffers of a model, with their gradients.
//!
//! Names follow the reference PyTorch state_dict (DESIGN.md §1.7) so checkpoints and fixtures map
//! one-to-one onto the reference model.

use crate::ops;
use crate::tensor::{DType, Device, Tensor};

#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct ParamId(pub usize);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ParamKind {
    /// Updated by the optimizer (weight decay applies, as in `optim.SGD(net.parameters(), ...)`).
    Trainable,
    /// Never updated, never decayed: the PEDCC head.
    Frozen,
    /// State that is not a parameter: batch-norm running statistics and counters.
    Buffer,
}

#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub value: Tensor,
    pub grad: Option<Tensor>,
    pub kind: ParamKind,
}

#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    params: Vec<Param>,
}

impl ParamStore {
    pub fn new() -> ParamStore {
        ParamStore::default()
    }

    pub fn add(&mut self, name: impl Into<String>, value: Tensor, kind: ParamKind) -> ParamId {
        let name = name.into();
        assert!(
            self.find(&name).is_none(),
            "parameter {name} registered twice"
        );
        self.params.push(Param {
            name,
            value,
            grad: None,
            kind,
        });
        ParamId(self.params.len() - 1)
    }

    pub fn get(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }

    pub fn get_mut(&mut self, id: ParamId) -> &mut Param {
        &mut self.params[id.0]
    }

    pub fn value(&self, id: ParamId) -> &Tensor {
        &self.params[id.0].value
    }

    pub fn set_value(&mut self, id: ParamId, value: Tensor) {
        let p = self.same_shape(id, &value);
        p.value = value;
    }

    /// The parameter, after checking that `value` has its shape.
    fn same_shape(&mut self, id: ParamId, value: &Tensor) -> &mut Param {
        let p = &mut self.params[id.0];
        assert_eq!(
            p.value.shape(),
            value.shape(),
            "new value for {} has the wrong shape",
            p.name
        );
        p
    }

    /// Writes `value` into the parameter's existing buffer (`Tensor::assign`), so its memory keeps
    /// its address: what a CUDA graph replays reads and writes the same buffers every step.
    pub fn assign_value(&mut self, id: ParamId, value: &Tensor) {
        self.same_shape(id, value).value.assign(value);
    }

    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.params.iter().position(|p| p.name == name).map(ParamId)
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = ParamId> {
        (0..self.params.len()).map(ParamId)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.params.iter_mut()
    }

    /// Number of scalar values in parameters of the given kind.
    pub fn count(&self, kind: ParamKind) -> usize {
        self.params
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| p.value.numel())
            .sum()
    }

    pub fn accumulate_grad(&mut self, id: ParamId, g: Tensor) {
        let p = &mut self.params[id.0];
        assert_eq!(
            p.value.shape(),
            g.shape(),
            "gradient of {} has the wrong shape",
            p.name
        );
        p.grad = Some(match p.grad.take() {
            Some(acc) => ops::add_fwd(&acc, &g),
            None => g,
        });
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.grad = None;
        }
    }

    /// Moves every tensor to `device` (gradients are dropped).
    pub fn to_device(&mut self, device: Device) {
        for p in &mut self.params {
            p.value = p.value.to_device(device);
            p.grad = None;
        }
    }

    /// Converts every tensor to a host dtype (gradient checks run the model in f64).
    pub fn to_dtype(&mut self, dtype: DType) {
        for p in &mut self.params {
            p.value = p.value.to_dtype(dtype);
            p.grad = None;
        }
    }
}
