//! topcoat: a CUDA-native LLM trainer that runs pretraining, SFT and preference tuning.
//!
//! Module map (one line each):
pub mod backend; // the Backend trait, the CPU reference and the CUDA backend
pub mod bench; // `topcoat bench`: training-step throughput on random tokens
pub mod config; // model presets and run configs (TOML + flag overrides)
pub mod data; // token shards, the window loader, tokenizers, `prepare`
pub mod demo; // `topcoat demo`: the three rounds on the embedded demo data, the report card
pub mod eval; // `eval` scoring: answer normalisation and matching, the prompts file, pair accuracy
pub mod generate; // generation with a KV cache: sampling (temperature, top-k, top-p), sessions
pub mod model; // GPT-2: parameter layout, forward and backward against Backend
pub mod optim; // AdamW parameter groups and the learning-rate schedule
pub mod profile; // a Backend wrapper that times every op (`bench --kernels`)
pub mod report; // `topcoat report`: a demo run as one self-contained HTML file (tables, inline SVG plots)
pub mod rng; // a small seedable RNG whose whole state is saved in checkpoints
pub mod run; // what each CLI command does (device choice, embedded data, pretrain, sft, dpo, sample, info)
pub mod stages; // pretrain, sft, reward, dpo, rl: loss and data wiring only
pub mod train; // the shared step loop, checkpoints, metrics
