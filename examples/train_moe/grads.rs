//! Data parallelism for the parameters every rank holds: their gradients (with the
//! loss and the expert loads) summed over the group in one all-reduce a step. Shared
//! by both of `train_moe`'s models.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use burn_ep::{EpGroup, EpResult, ExpertParallelBackend};

/// Takes the gradient of every parameter shared by all ranks (the experts'
/// parameters stay local) out of `grads`, flattened, in the modules' visiting order.
struct TakeSharedGrads<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    skip: Vec<ParamId>,
    taken: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for TakeSharedGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.skip.contains(&param.id) {
            return;
        }
        let value = param.val();
        let (shape, device) = (value.dims(), value.device());
        // A missing gradient is a zero one, so every rank takes part in every sum.
        let grad: Tensor<B::InnerBackend, D> = self
            .grads
            .remove(param.id)
            .unwrap_or_else(|| Tensor::zeros(shape, &device));
        self.taken
            .push(grad.reshape([shape.iter().product::<usize>()]));
    }
}

/// Puts the summed gradients back, in the order [`TakeSharedGrads`] took them.
struct PutSharedGrads<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    skip: Vec<ParamId>,
    /// Every shared gradient, one after another.
    summed: &'a [f32],
    device: B::Device,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for PutSharedGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.skip.contains(&param.id) {
            return;
        }
        let shape = param.val().dims();
        let (mine, rest) = self.summed.split_at(shape.iter().product());
        self.summed = rest;
        let grad = TensorData::new(mine.to_vec(), shape);
        self.grads
            .register::<B::InnerBackend, D>(param.id, Tensor::from_data(grad, &self.device));
    }
}

/// One all-reduce for the step: the loss, every shared gradient and the expert
/// loads travel in one message, read from the device in one host read. Replaces
/// the gradients of the parameters not in `skip` (the rank's own) with their sums;
/// returns the summed loss and loads.
pub fn sum_over_group<B: AutodiffBackend + ExpertParallelBackend, M: Module<B>>(
    model: &M,
    skip: Vec<ParamId>,
    grads: &mut GradientsParams,
    loss: Tensor<B::InnerBackend, 1>,
    loads: &[Vec<usize>],
    group: &EpGroup<B>,
) -> EpResult<(f32, Vec<Vec<usize>>)> {
    let mut take = TakeSharedGrads::<B> {
        grads,
        skip: skip.clone(),
        taken: vec![loss],
    };
    model.visit(&mut take);
    let on_device = Tensor::cat(take.taken, 0);
    let mut values: Vec<f32> = on_device.into_data().convert::<f32>().to_vec().unwrap();
    values.extend(loads.iter().flatten().map(|&l| l as f32));
    let summed = group.all_reduce_sum(values)?;
    let load_values = loads.iter().map(Vec::len).sum::<usize>();
    let (tensors, summed_loads) = summed.split_at(summed.len() - load_values);
    let mut put = PutSharedGrads::<B> {
        grads,
        skip,
        summed: &tensors[1..],
        device: group.device().clone(),
    };
    model.visit(&mut put);
    let mut rest = summed_loads;
    let loads = loads
        .iter()
        .map(|layer| {
            let (mine, after) = rest.split_at(layer.len());
            rest = after;
            mine.iter().map(|&v| v as usize).collect()
        })
        .collect();
    Ok((tensors[0], loads))
}
