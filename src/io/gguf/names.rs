//! lmforge ↔ GGUF tensor names, the tensors a config has in a GGUF file, and the one layout
//! change llama.cpp makes to the weights (the q/k row permutation).
//!
//! The same table and the same [`gguf_tensors`] list drive import and export, so the two
//! directions cannot drift apart.

use candle_core::Tensor;

use crate::config::ModelConfig;

/// How a tensor's rows are ordered in the GGUF file relative to lmforge (= Hugging Face).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOrder {
    /// Stored exactly as lmforge uses it.
    Same,
    /// Rows of each head interleaved for llama.cpp's rotary embedding; the head count is that of
    /// the query heads (`attention.heads`) — see [`unpermute_rope_rows`].
    RopeInterleavedQueryHeads,
    /// As above, over the key/value heads (`attention.kv_heads`).
    RopeInterleavedKvHeads,
}

impl RowOrder {
    /// The head count the permutation splits the rows into (`None` for [`RowOrder::Same`]).
    pub fn heads(self, config: &ModelConfig) -> Option<usize> {
        match self {
            RowOrder::Same => None,
            RowOrder::RopeInterleavedQueryHeads => Some(config.attention.heads),
            RowOrder::RopeInterleavedKvHeads => Some(config.attention.kv_heads),
        }
    }
}

/// One row of the name table: lmforge's canonical name, the GGUF name, and the row order.
/// `{i}` stands for the layer index in both names. `{e}` (an expert index) appears only in the
/// canonical name: the GGUF tensor stacks every expert's matrix along a new leading dimension
/// (llama.cpp's `*_exps` tensors, `[experts, out, in]`).
#[derive(Clone, Copy, Debug)]
pub struct TensorName {
    pub canonical: &'static str,
    pub gguf: &'static str,
    pub rows: RowOrder,
}

const fn name(canonical: &'static str, gguf: &'static str, rows: RowOrder) -> TensorName {
    TensorName { canonical, gguf, rows }
}

/// lmforge ↔ GGUF tensor names for `general.architecture = llama` (llama.cpp's `LLM_ARCH_LLAMA`
/// names, Mixtral's experts included). Importers read it left to right, exporters right to left;
/// see [`to_gguf_name`] and [`from_gguf_name`].
pub const LLAMA_TENSOR_NAMES: &[TensorName] = &[
    name("tok_embeddings.weight", "token_embd.weight", RowOrder::Same),
    name("layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight", RowOrder::Same),
    name("layers.{i}.attn.q.weight", "blk.{i}.attn_q.weight", RowOrder::RopeInterleavedQueryHeads),
    name("layers.{i}.attn.k.weight", "blk.{i}.attn_k.weight", RowOrder::RopeInterleavedKvHeads),
    name("layers.{i}.attn.v.weight", "blk.{i}.attn_v.weight", RowOrder::Same),
    name("layers.{i}.attn.o.weight", "blk.{i}.attn_output.weight", RowOrder::Same),
    name("layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight", RowOrder::Same),
    name("layers.{i}.ffn.gate.weight", "blk.{i}.ffn_gate.weight", RowOrder::Same),
    name("layers.{i}.ffn.up.weight", "blk.{i}.ffn_up.weight", RowOrder::Same),
    name("layers.{i}.ffn.down.weight", "blk.{i}.ffn_down.weight", RowOrder::Same),
    name("layers.{i}.ffn.router.weight", "blk.{i}.ffn_gate_inp.weight", RowOrder::Same),
    name("layers.{i}.ffn.experts.{e}.gate.weight", "blk.{i}.ffn_gate_exps.weight", RowOrder::Same),
    name("layers.{i}.ffn.experts.{e}.up.weight", "blk.{i}.ffn_up_exps.weight", RowOrder::Same),
    name("layers.{i}.ffn.experts.{e}.down.weight", "blk.{i}.ffn_down_exps.weight", RowOrder::Same),
    name("final_norm.weight", "output_norm.weight", RowOrder::Same),
    name("lm_head.weight", "output.weight", RowOrder::Same),
];

/// Where a canonical tensor lives in a GGUF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufSlot {
    pub name: String,
    pub rows: RowOrder,
    /// `Some(e)`: slice `e` of a tensor stacking every expert.
    pub expert: Option<usize>,
}

/// The GGUF slot of canonical tensor `canonical`.
pub fn to_gguf_name(canonical: &str) -> Option<GgufSlot> {
    LLAMA_TENSOR_NAMES.iter().find_map(|t| {
        let found = captures(canonical, t.canonical)?;
        let expert = match found.get('e') {
            Some(e) => Some(e.parse().ok()?),
            None => None,
        };
        Some(GgufSlot { name: fill(t.gguf, &found), rows: t.rows, expert })
    })
}

/// The canonical name of GGUF tensor `gguf` (with `{e}` left in it for a stack of experts), and
/// how its rows are stored in the file.
pub fn from_gguf_name(gguf: &str) -> Option<(String, RowOrder)> {
    LLAMA_TENSOR_NAMES.iter().find_map(|t| Some((fill(t.canonical, &captures(gguf, t.gguf)?), t.rows)))
}

/// Values of the `{x}` placeholders of `pattern` found in `name` (each a non-empty run of
/// digits), or `None` when `name` does not match.
fn captures(name: &str, pattern: &str) -> Option<Captures> {
    let mut found = Captures::default();
    let mut rest = name;
    let mut pattern = pattern;
    while let Some(open) = pattern.find('{') {
        let literal = &pattern[..open];
        let key = pattern[open + 1..].chars().next()?;
        pattern = &pattern[open + 3..]; // `{x}`
        rest = rest.strip_prefix(literal)?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        found.0.push((key, rest[..digits].to_string()));
        rest = &rest[digits..];
    }
    (rest == pattern).then_some(found)
}

#[derive(Default)]
struct Captures(Vec<(char, String)>);

impl Captures {
    fn get(&self, key: char) -> Option<&str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
    }
}

/// `pattern` with every placeholder found in `values` replaced (others are kept as written).
fn fill(pattern: &str, values: &Captures) -> String {
    values.0.iter().fold(pattern.to_string(), |s, (key, value)| s.replace(&format!("{{{key}}}"), value))
}

// ---------------------------------------------------------------------------------------------
// The tensors of a config, as a GGUF file holds them
// ---------------------------------------------------------------------------------------------

/// One tensor of a GGUF file and the canonical tensors it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    /// Row-major shape (candle's order: the reverse of GGUF's `ne`).
    pub shape: Vec<usize>,
    pub rows: RowOrder,
    /// Canonical tensors in it: one, or every expert's in expert order.
    pub parts: Vec<String>,
    /// The parts are stacked along a new dim 0 (a mixture's experts), even when there is one.
    pub stacked: bool,
}

/// Every tensor a GGUF `llama` file of `config` holds, in `param_specs` order; the names of
/// canonical parameters the table cannot place are returned as the error.
pub fn gguf_tensors(config: &ModelConfig) -> Result<Vec<GgufTensor>, Vec<String>> {
    let mut tensors: Vec<GgufTensor> = Vec::new();
    let mut unplaced = Vec::new();
    for spec in config.param_specs() {
        let Some(slot) = to_gguf_name(&spec.name) else {
            unplaced.push(spec.name);
            continue;
        };
        match slot.expert {
            None => tensors.push(GgufTensor {
                name: slot.name,
                shape: spec.shape,
                rows: slot.rows,
                parts: vec![spec.name],
                stacked: false,
            }),
            Some(expert) => match tensors.iter_mut().find(|t| t.name == slot.name) {
                // param_specs lists experts in order, so expert `e` is the stack's `e`-th part.
                Some(stack) if stack.parts.len() == expert => {
                    stack.shape[0] += 1;
                    stack.parts.push(spec.name);
                }
                Some(_) => unplaced.push(spec.name),
                None if expert == 0 => {
                    let shape = [&[1], spec.shape.as_slice()].concat();
                    tensors.push(GgufTensor {
                        name: slot.name,
                        shape,
                        rows: slot.rows,
                        parts: vec![spec.name],
                        stacked: true,
                    });
                }
                None => unplaced.push(spec.name),
            },
        }
    }
    if unplaced.is_empty() {
        Ok(tensors)
    } else {
        Err(unplaced)
    }
}

// ---------------------------------------------------------------------------------------------
// The q/k row permutation
// ---------------------------------------------------------------------------------------------

/// Undo llama.cpp's reordering of a query or key projection (`[heads * head_dim, in]`).
///
/// lmforge (like Hugging Face) applies RoPE with `rotate_half`: within a head, dim `j` rotates
/// with dim `j + head_dim/2`. ggml's llama rope rotates *adjacent* dims `(2j, 2j+1)` instead, so
/// `convert_hf_to_gguf.py` (`LlamaModel.permute`) reorders each head's output rows to make the two
/// agree: `w.reshape(heads, 2, head_dim/2, in).swapaxes(1, 2)`, i.e. file row `2j + t` holds
/// HF row `t * head_dim/2 + j`. With `head_dim = 4` a head's rows `[r0, r1, r2, r3]` are stored
/// as `[r0, r2, r1, r3]`. This is the inverse: `reshape(heads, head_dim/2, 2, in)`, swap axes 1
/// and 2, reshape back. The key projection uses the KV head count.
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    reorder_heads(w, heads, true)
}

/// The exporter's direction: lmforge/HF row order → llama.cpp's (`permute` in
/// `convert_hf_to_gguf.py`). Inverse of [`unpermute_rope_rows`].
pub fn permute_rope_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    reorder_heads(w, heads, false)
}

fn reorder_heads(w: &Tensor, heads: usize, from_gguf: bool) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        candle_core::bail!("cannot split {rows} rows into {heads} heads of an even width")
    }
    let half = rows / heads / 2;
    let split = if from_gguf { (heads, half, 2, cols) } else { (heads, 2, half, cols) };
    w.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}
