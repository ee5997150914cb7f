//! Key/value caches for incremental decoding.
//!
//! A model is shared and immutable; a cache belongs to one sequence and is passed `&mut` into
//! each forward. A layer's cache takes the keys/values of the new tokens and returns everything
//! those tokens may attend to, together with each key's absolute position, so attention builds
//! its mask (causal, sliding window) and ALiBi biases from positions, whatever order the cache
//! stores its slots in.

use candle_core::{Result, Tensor};

/// What one step's queries may attend to in one layer.
pub struct LayerKv {
    /// `(B, kv_heads, S, head_dim)`
    pub k: Tensor,
    /// `(B, kv_heads, S, head_dim)`
    pub v: Tensor,
    /// Absolute position of each of the `S` key slots.
    pub positions: Vec<usize>,
}

/// One layer's cache.
pub trait KvCache: Send {
    /// Store keys/values `(B, kv_heads, T, head_dim)` of absolute positions `start..start + T`
    /// and return all keys/values the new queries may see (the cached ones and the new ones).
    fn append(&mut self, k: &Tensor, v: &Tensor, start: usize) -> Result<LayerKv>;

    /// Positions currently held.
    fn len(&self) -> usize;

    /// Keep batch rows `rows` (u32 `(N,)`): row `i` becomes the old row `rows[i]`. Beam search
    /// calls this after each step, when hypotheses are extended, copied or dropped.
    fn reorder(&mut self, rows: &Tensor) -> Result<()>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Preallocated `(B, KV, capacity, hd)` key and value buffers written in place (a clone shares
/// them).
#[derive(Clone)]
struct Buffers {
    k: Tensor,
    v: Tensor,
}

impl Buffers {
    fn new(like: &Tensor, capacity: usize) -> Result<Self> {
        let (b, kv, _, hd) = like.dims4()?;
        let zeros = || Tensor::zeros((b, kv, capacity, hd), like.dtype(), like.device());
        Ok(Buffers { k: zeros()?, v: zeros()? })
    }

    fn capacity(&self) -> usize {
        self.k.dim(2).expect("buffers are 4-d")
    }

    fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        self.k = self.k.index_select(rows, 0)?;
        self.v = self.v.index_select(rows, 0)?;
        Ok(())
    }

    /// Write `len` positions of `k`/`v` starting at `from` into slots starting at `slot`.
    fn write(&self, k: &Tensor, v: &Tensor, from: usize, len: usize, slot: usize) -> Result<()> {
        self.k.slice_set(&k.narrow(2, from, len)?.contiguous()?, 2, slot)?;
        self.v.slice_set(&v.narrow(2, from, len)?.contiguous()?, 2, slot)
    }
}

/// Keeps every position: memory grows with the sequence. Buffers double when full, so appending
/// one token costs O(1) amortised instead of re-copying the whole cache.
#[derive(Default)]
pub struct FullCache {
    buffers: Option<Buffers>,
    len: usize,
}

impl KvCache for FullCache {
    fn append(&mut self, k: &Tensor, v: &Tensor, start: usize) -> Result<LayerKv> {
        let new_tokens = k.dim(2)?;
        let needed = self.len + new_tokens;
        if self.buffers.as_ref().is_none_or(|b| b.capacity() < needed) {
            let grown = Buffers::new(k, needed.next_power_of_two().max(64))?;
            if let Some(old) = &self.buffers {
                grown.write(&old.k, &old.v, 0, self.len, 0)?;
            }
            self.buffers = Some(grown);
        }
        let buffers = self.buffers.as_ref().expect("allocated above");
        buffers.write(k, v, 0, new_tokens, self.len)?;
        self.len = needed;
        Ok(LayerKv {
            k: buffers.k.narrow(2, 0, needed)?,
            v: buffers.v.narrow(2, 0, needed)?,
            positions: (start + new_tokens - needed..start + new_tokens).collect(),
        })
    }

    fn len(&self) -> usize {
        self.len
    }

    fn reorder(&mut self, rows: &Tensor) -> Result<()> {
        self.buffers.as_mut().map_or(Ok(()), |b| b.select_rows(rows))
    }
}

/// Mistral's rolling buffer: exactly `window` slots per layer, position `p` stored in slot
/// `p mod window`, so memory stays constant however long the generation runs. Positions stay
/// absolute: RoPE was applied to the keys before they were cached, and the returned positions
/// let attention mask by true distance.
///
/// Worked example, `window = 4`, after a 6-token prompt (positions 0..=5):
///
/// ```text
/// slot:      0  1  2  3
/// position:  4  5  2  3      (4 overwrote 0, 5 overwrote 1)
/// ```
///
/// Decoding position 6 (one token, with the buffer full): 6 is first written to slot
/// `6 mod 4 = 2`, replacing 2, and attention is handed the buffer itself, positions
/// `[4, 5, 6, 3]`; the window mask (`6 − p < 4`) keeps all four. Nothing is lost by writing
/// first: the position a token evicts is `window` before it, just outside its own window. So a
/// decoded token costs the same at every position, and copies nothing.
///
/// A chunk of `T > 1` tokens that wraps the buffer cannot be written first: its early queries
/// still see the positions its later tokens evict. It sees the `window` cached slots plus its
/// own `T` keys (one copy), and is written after; so a prefill chunk costs `(T, window + T)`
/// scores, whatever the prompt length. A chunk that evicts nothing is written first too.
pub struct RollingCache {
    window: usize,
    buffers: Option<Buffers>,
    /// Absolute position held by each filled slot. Slots fill in order 0, 1, … until the
    /// buffer wraps, so the filled ones are a prefix, `slot_positions.len()` long.
    slot_positions: Vec<usize>,
}

impl RollingCache {
    pub fn new(window: usize) -> Self {
        RollingCache { window, buffers: None, slot_positions: Vec::with_capacity(window) }
    }

    /// Keep the last `window` of positions `start..start + T` (keys/values `(B, KV, T, hd)`),
    /// each at slot `position mod window`; a run of consecutive positions wraps around the
    /// buffer at most once.
    fn store(&mut self, k: &Tensor, v: &Tensor, start: usize) -> Result<()> {
        let buffers = self.buffers.as_ref().expect("allocated by append");
        let new_tokens = k.dim(2)?;
        let keep = new_tokens.min(self.window);
        let first = start + new_tokens - keep;
        // Every slot from the filled prefix to the new end is among those written below.
        let filled = (self.slot_positions.len() + new_tokens).min(self.window);
        self.slot_positions.resize(filled, 0);
        let mut written = 0;
        while written < keep {
            let slot = (first + written) % self.window;
            let run = (keep - written).min(self.window - slot);
            buffers.write(k, v, new_tokens - keep + written, run, slot)?;
            for (held, position) in self.slot_positions[slot..slot + run].iter_mut().zip(first + written..) {
                *held = position;
            }
            written += run;
        }
        Ok(())
    }
}

impl KvCache for RollingCache {
    fn append(&mut self, k: &Tensor, v: &Tensor, start: usize) -> Result<LayerKv> {
        let new_tokens = k.dim(2)?;
        let buffers = match &self.buffers {
            Some(b) => b.clone(),
            None => self.buffers.insert(Buffers::new(k, self.window)?).clone(),
        };
        let filled = self.slot_positions.len();
        if new_tokens == 1 || filled + new_tokens <= self.window {
            // Written first (see above): the buffer's filled slots are exactly what the new
            // queries may see.
            self.store(k, v, start)?;
            let filled = self.slot_positions.len();
            return Ok(LayerKv {
                k: buffers.k.narrow(2, 0, filled)?,
                v: buffers.v.narrow(2, 0, filled)?,
                positions: self.slot_positions.clone(),
            });
        }
        // Every filled slot, then the new keys; stored after.
        let mut positions = Vec::with_capacity(filled + new_tokens);
        positions.extend_from_slice(&self.slot_positions);
        positions.extend(start..start + new_tokens);
        let visible_k = Tensor::cat(&[&buffers.k.narrow(2, 0, filled)?, k], 2)?;
        let visible_v = Tensor::cat(&[&buffers.v.narrow(2, 0, filled)?, v], 2)?;
        self.store(k, v, start)?;
        Ok(LayerKv { k: visible_k, v: visible_v, positions })
    }

    fn len(&self) -> usize {
        self.slot_positions.len()
    }

    fn reorder(&mut self, rows: &Tensor) -> Result<()> {
        self.buffers.as_mut().map_or(Ok(()), |b| b.select_rows(rows))
    }
}
