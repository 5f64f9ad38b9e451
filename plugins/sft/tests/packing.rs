//! Packed examples are isolated: the logits of an example packed into a row with others
//! equal its logits alone, for both model families (segment ids in the attention mask,
//! positions restarting at 0).
use plumb_core::model::gpt2::{Gpt2Config, Gpt2ForCausalLm};
use plumb_core::model::llama::{LlamaConfig, LlamaForCausalLm};
use plumb_core::tch::{self, Device, Tensor};
use plumb_core::Policy;
use plumb_sft::batching::{collate, Batch};
use plumb_sft::template::Example;

fn examples() -> Vec<Example> {
    [vec![3, 14, 15, 9, 2, 6], vec![5, 35, 8], vec![9, 7, 9, 3, 2]]
        .into_iter()
        .map(|ids: Vec<i64>| Example { trained: (0..ids.len()).map(|j| j > 1).collect(), ids })
        .collect()
}

fn logits(policy: &dyn Policy, batch: &Batch) -> Tensor {
    policy.forward(&batch.input_ids, &batch.positions, batch.attention_mask.as_ref(), None).unwrap()
}

fn assert_isolated(policy: &dyn Policy) {
    let examples = examples();
    let packed = collate(&examples, &[&[0, 1, 2]], Device::Cpu);
    let packed_logits = logits(policy, &packed);
    let mut at = 0;
    for i in 0..examples.len() {
        let alone = collate(&examples, &[&[i]], Device::Cpu);
        assert!(alone.attention_mask.is_none(), "one full example needs no mask");
        let expected = logits(policy, &alone).squeeze_dim(0);
        let len = examples[i].len() as i64;
        let got = packed_logits.get(0).narrow(0, at, len);
        let diff = (&got - &expected).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "example {i}: packed logits differ from its own by {diff}");
        at += len;
    }
    // Without the segments, the later examples would see the earlier ones.
    let unmasked = policy.forward(&packed.input_ids, &packed.positions, None, None).unwrap();
    let leak = (&unmasked.get(0).narrow(0, 6, 3) - &packed_logits.get(0).narrow(0, 6, 3)).abs().max().double_value(&[]);
    assert!(leak > 1e-3, "the check cannot tell isolation from none");
}

#[test]
fn packed_examples_see_only_themselves() {
    tch::manual_seed(0);
    let llama: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32
    }))
    .unwrap();
    assert_isolated(&LlamaForCausalLm::new(llama, Device::Cpu).unwrap());
    let gpt2: Gpt2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32
    }))
    .unwrap();
    assert_isolated(&Gpt2ForCausalLm::new(gpt2, Device::Cpu).unwrap());
}
