//! The vendored change to candle's backward pass (vendor/README.md): the first gradient of a
//! node is stored rather than added into zeros. Sums over several consumers, gradients of
//! views, and the checks the add into zeros used to make must all survive it.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, Var};

#[test]
fn gradients_sum_over_consumers_and_views() -> Result<()> {
    let x = Var::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu)?;
    // x feeds three consumers: itself squared, its transpose, and a narrowed view.
    let y = (x.sqr()?.sum_all()? + x.t()?.affine(3.0, 0.0)?.sum_all()? + x.narrow(1, 1, 2)?.sum_all()?)?;
    let grads = y.backward()?;
    let grad = grads.get(x.as_tensor()).expect("x has a gradient");
    assert!(grad.is_contiguous());
    // d/dx = 2x + 3 + [0, 1, 1]
    assert_eq!(grad.to_vec2::<f32>()?, [[5.0, 8.0, 10.0], [11.0, 14.0, 16.0]]);
    // A single consumer: the gradient is exactly the upstream one.
    let z = Var::new(&[1f32, -2.0], &Device::Cpu)?;
    let grads = z.affine(-0.5, 1.0)?.sum_all()?.backward()?;
    assert_eq!(grads.get(z.as_tensor()).unwrap().to_vec1::<f32>()?, [-0.5, -0.5]);
    Ok(())
}

/// An op whose backward returns a gradient of the wrong shape.
struct WrongShapeGrad;

impl CustomOp1 for WrongShapeGrad {
    fn name(&self) -> &'static str {
        "wrong-shape-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((storage.clone(), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(Tensor::zeros(arg.elem_count() + 1, arg.dtype(), arg.device())?))
    }
}

#[test]
fn a_gradient_of_the_wrong_shape_is_an_error() -> Result<()> {
    let x = Var::new(&[1f32, 2.0], &Device::Cpu)?;
    let err = x.apply_op1(WrongShapeGrad)?.sum_all()?.backward().unwrap_err();
    assert!(err.to_string().contains("shape mismatch"), "{err}");
    Ok(())
}
