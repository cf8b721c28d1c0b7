//! Token shards: round trips, an independently packed llm.c shard, and bad headers.

use std::path::Path;

use topcoat::data::{write_shard, DataError, Loader, Shard, MAGIC_U16, MAGIC_U32};

/// An llm.c shard packed by hand, not with topcoat's writer.
fn hand_packed(magic: i32, version: i32, count: i32, tokens: &[u16]) -> Vec<u8> {
    let mut header = [0i32; 256];
    header[0] = magic;
    header[1] = version;
    header[2] = count;
    let mut bytes: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    bytes
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn u16_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.bin");
    let toks: Vec<u32> = (0..5000).map(|i| (i * 7919) % 50261).collect();
    write_shard(&p, &toks, 50261).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1024 + 2 * 5000);
    let s = Shard::open(&p).unwrap();
    assert_eq!(s.width(), 2);
    assert_eq!(s.len(), 5000);
    assert_eq!(s.to_vec(), toks);
    assert_eq!(s.get(4999), toks[4999]);
    let mut out = vec![0i32; 10];
    s.copy_range(100, &mut out);
    let want: Vec<i32> = toks[100..110].iter().map(|&t| t as i32).collect();
    assert_eq!(out, want);
    s.validate_vocab(50261).unwrap();
    assert_eq!(dir_names(dir.path()), vec!["a.bin"], "no temp file left");
}

#[test]
fn u32_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.bin");
    let toks: Vec<u32> = (0..3000).map(|i| (i * 104_729) % 200_000).collect();
    write_shard(&p, &toks, 200_000).unwrap();
    let raw = std::fs::read(&p).unwrap();
    assert_eq!(i32::from_le_bytes(raw[0..4].try_into().unwrap()), MAGIC_U32);
    assert_eq!(raw.len(), 1024 + 4 * 3000);
    let s = Shard::open(&p).unwrap();
    assert_eq!(s.width(), 4);
    assert_eq!(s.to_vec(), toks);
    let mut out = vec![0i32; 3];
    s.copy_range(2997, &mut out);
    assert_eq!(
        out,
        [toks[2997] as i32, toks[2998] as i32, toks[2999] as i32]
    );
}

#[test]
fn independently_packed_llmc_shard_loads() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("llmc.bin");
    let toks: [u16; 6] = [15496, 995, 50256, 0, 65535, 1];
    std::fs::write(&p, hand_packed(20240520, 1, 6, &toks)).unwrap();
    let s = Shard::open(&p).unwrap();
    assert_eq!(s.len(), 6);
    assert_eq!(s.to_vec(), toks.map(u32::from).to_vec());
    // And topcoat's writer produces exactly these bytes.
    let q = dir.path().join("ours.bin");
    write_shard(&q, &toks.map(u32::from), 65536).unwrap();
    assert_eq!(std::fs::read(&q).unwrap(), std::fs::read(&p).unwrap());
    assert_eq!(MAGIC_U16, 20240520);
}

fn open_err(bytes: Vec<u8>, name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    let e = Shard::open(&p).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(name), "message names the file: {msg}");
    msg
}

#[test]
fn wrong_magic_is_named() {
    let msg = open_err(hand_packed(12345, 1, 2, &[1, 2]), "magic.bin");
    assert!(msg.contains("bad shard magic 12345"), "{msg}");
    assert!(
        msg.contains("20240520") && msg.contains("20240801"),
        "{msg}"
    );
}

#[test]
fn unknown_version_is_named() {
    let msg = open_err(hand_packed(20240520, 7, 2, &[1, 2]), "version.bin");
    assert!(msg.contains("unknown shard version 7"), "{msg}");
}

#[test]
fn file_shorter_than_header_says() {
    let msg = open_err(hand_packed(20240520, 1, 10, &[1, 2, 3]), "short.bin");
    assert!(msg.contains("shorter than its header says"), "{msg}");
    assert!(
        msg.contains("expected 1044 bytes, found 1030 bytes"),
        "{msg}"
    );
}

#[test]
fn file_longer_than_header_says() {
    let msg = open_err(hand_packed(20240520, 1, 1, &[1, 2, 3]), "long.bin");
    assert!(msg.contains("longer than its header says"), "{msg}");
}

#[test]
fn file_shorter_than_header_block() {
    let msg = open_err(vec![0u8; 100], "tiny.bin");
    assert!(
        msg.contains("100 bytes, shorter than the 1024-byte shard header"),
        "{msg}"
    );
}

#[test]
fn token_id_out_of_vocab_through_loader() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ids.bin");
    let mut toks: Vec<u16> = (0..100).collect();
    toks[37] = 1000;
    std::fs::write(&p, hand_packed(20240520, 1, 100, &toks)).unwrap();
    let e = Loader::sequential(&[&p], 1, 8, 0, 1, 500).unwrap_err();
    assert!(matches!(
        e,
        DataError::TokenOutOfRange {
            offset: 37,
            id: 1000,
            ..
        }
    ));
    let msg = e.to_string();
    assert!(msg.contains("ids.bin"), "{msg}");
    assert!(msg.contains("token id 1000 at token offset 37"), "{msg}");
    assert!(msg.contains("vocab size is 500"), "{msg}");
}

#[test]
fn writer_rejects_out_of_vocab_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.bin");
    write_shard(&p, &[1, 2, 3], 100).unwrap();
    let before = std::fs::read(&p).unwrap();
    let e = write_shard(&p, &[1, 200, 3], 100).unwrap_err();
    assert!(e.to_string().contains("w.bin"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), before, "old shard untouched");
    assert_eq!(dir_names(dir.path()), vec!["w.bin"], "no temp file left");
}
