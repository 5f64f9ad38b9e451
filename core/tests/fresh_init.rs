//! A fresh model draws its weights as tch's own constructors do. Alone in its test binary
//! (its own process), since it compares two draws from libtorch's global generator, which
//! the parallel unit tests of the library would otherwise draw from in between.
use plumb_core::model::vars::Vars;
use plumb_core::tch::{nn, Device};

#[test]
fn fresh_draws_as_tch_does() {
    let config = nn::LinearConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() };
    let reference = nn::VarStore::new(Device::Cpu);
    plumb_core::tch::manual_seed(3);
    let expected = nn::linear(reference.root() / "l", 4, 3, config);
    let fresh = nn::VarStore::new(Device::Cpu);
    plumb_core::tch::manual_seed(3);
    let got = (&Vars::fresh(fresh.root()) / "l").linear(4, 3, config);
    assert_eq!((&got.ws - &expected.ws).abs().max().double_value(&[]), 0.0);
    assert_eq!((got.bs.unwrap() - expected.bs.unwrap()).abs().max().double_value(&[]), 0.0);
}
