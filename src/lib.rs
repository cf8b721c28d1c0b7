//! topcoat: a CUDA-native LLM trainer that runs pretraining, SFT and preference tuning.
//!
//! Layers, top down (an arrow only goes down; docs/ARCHITECTURE.md has the data flow): the
//! binary (`src/main.rs`, `src/cli/`: flags and printing) calls [`commands`], which build a job
//! and run it on the backend that [`runtime`] opened; training commands go through one stage
//! runner (`commands/stage.rs`) into a stage's objective ([`stages`]) and the shared loop
//! ([`train`]), over the model ([`model`]) written against the [`backend`] trait; [`data`]
//! knows no model.
//!
//! Module map (one line each):
pub mod backend; // the Backend trait, the CPU reference, the CUDA backend, the per-op profiler
pub mod commands; // what each CLI command does, as library calls (one module per command)
pub mod config; // model presets and run configs (TOML + flag overrides)
pub mod data; // token shards, the window loader, tokenizers, `prepare`
pub mod dist; // data parallelism: rank info, the Collective trait (NCCL, loopback TCP, solo)
pub mod generate; // generation with a KV cache: sampling (temperature, top-k, top-p), sessions
pub mod hf; // Hugging Face model directories and PEFT adapter directories in and out
pub mod model; // GPT-2 and the Llama family against Backend: layout, LoRA, chunked head, memory plan
pub mod optim; // AdamW parameter groups and the learning-rate schedule
pub mod rng; // a small seedable RNG whose whole state is saved in checkpoints
pub mod runtime; // the one place that picks the device, rank and collective; opens the backend once
pub mod scoring; // answer normalisation and matching, the eval prompts file, pair accuracy
pub mod stages; // pretrain, sft, reward, dpo, rl: loss and data wiring only
pub mod train; // the shared step loop, checkpoints, metrics
