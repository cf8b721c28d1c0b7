//! The host collective's tests: ranks as threads of one process over loopback TCP.

use super::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::Role;
use crate::dist::rendezvous::{rendezvous, Meeting};
use crate::rng::Rng;
use std::net::TcpListener;
use std::sync::Arc;
use std::thread;

fn info(rank: usize, world_size: usize) -> RankInfo {
    RankInfo {
        rank,
        world_size,
        local_rank: rank,
        launcher: "test".into(),
    }
}

/// `w` connected collectives, rank order, each read waiting at most `timeout`.
fn group(w: usize, timeout: Duration) -> Vec<HostCollective> {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let hs: Vec<_> = (0..w)
        .map(|r| {
            let m = Meeting::Tcp { addr: addr.clone() };
            thread::spawn(move || {
                let star = rendezvous(&info(r, w), &m, Duration::from_secs(5)).unwrap();
                HostCollective::new(star, timeout).unwrap()
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Runs `f(rank, collective)` on every rank at once; the results in rank order.
fn on_all<T: Send + 'static>(
    cs: Vec<HostCollective>,
    f: impl Fn(usize, &HostCollective) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let hs: Vec<_> = cs
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let f = f.clone();
            thread::spawn(move || f(r, &c))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Fresh values of wildly different magnitudes, so that the order of a sum shows in its bits.
fn spread(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.normal() * 10f32.powi(rng.below(9) as i32 - 2))
        .collect()
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[test]
fn all_reduce_sum_is_the_rank_order_left_fold_bit_for_bit() {
    let s = seed();
    let mut rng = Rng::new(s);
    // Two buffers per rank (40 values in all), as the gradient buckets come.
    let inputs: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
        .map(|_| (spread(&mut rng, 25), spread(&mut rng, 15)))
        .collect();
    let flat: Vec<Vec<f32>> = inputs
        .iter()
        .map(|(a, b)| [a.clone(), b.clone()].concat())
        .collect();
    let fold: Vec<f32> = (0..40)
        .map(|i| (flat[0][i] + flat[1][i]) + flat[2][i])
        .collect();
    let reverse: Vec<f32> = (0..40)
        .map(|i| (flat[2][i] + flat[1][i]) + flat[0][i])
        .collect();
    assert_ne!(
        fold.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        reverse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        "seed {s}: the values must tell the orders apart"
    );
    let inputs = Arc::new(inputs);
    let out = on_all(group(3, Duration::from_secs(10)), move |r, c| {
        let be = CpuBackend;
        let mut a = be.upload(&inputs[r].0, Role::Grad).unwrap();
        let mut b = be.upload(&inputs[r].1, Role::Grad).unwrap();
        Collective::<CpuBackend>::all_reduce_sum(c, &be, &mut [&mut a, &mut b]).unwrap();
        Collective::<CpuBackend>::wait(c, &be).unwrap();
        [a, b].concat()
    });
    for (r, got) in out.iter().enumerate() {
        let bits: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
        let want: Vec<u32> = fold.iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, want, "rank {r}, seed {s}");
    }
}

#[test]
fn host_sums_reduce_broadcast_bytes_and_barrier() {
    let s = seed();
    let mut rng = Rng::new(s);
    let host: Vec<Vec<f64>> = (0..3)
        .map(|_| {
            (0..5)
                .map(|_| rng.next_f64() * 10f64.powi(rng.below(30) as i32 - 15))
                .collect()
        })
        .collect();
    let fold: Vec<f64> = (0..5)
        .map(|i| (host[0][i] + host[1][i]) + host[2][i])
        .collect();
    let grads: Vec<Vec<f32>> = (0..3).map(|_| spread(&mut rng, 12)).collect();
    let sum_to_2: Vec<f32> = (0..12)
        .map(|i| (grads[0][i] + grads[1][i]) + grads[2][i])
        .collect();
    let (host2, grads2) = (Arc::new(host.clone()), Arc::new(grads.clone()));
    let out = on_all(group(3, Duration::from_secs(10)), move |r, c| {
        let be = CpuBackend;
        let mut h = host2[r].clone();
        c.all_reduce_host_checked(&mut h);
        // reduce to rank 2: only its buffer is defined afterwards.
        let mut g = be.upload(&grads2[r], Role::Grad).unwrap();
        Collective::<CpuBackend>::reduce_sum(c, &be, &mut [&mut g], 2).unwrap();
        // broadcast rank 1's buffer.
        let mut w = be.upload(&grads2[r][..7], Role::Param).unwrap();
        Collective::<CpuBackend>::broadcast(c, &be, &mut [&mut w], 1).unwrap();
        let bytes = Collective::<CpuBackend>::broadcast_bytes(
            c,
            format!("settings of rank {r}").into_bytes(),
            2,
        )
        .unwrap();
        let from0 =
            Collective::<CpuBackend>::broadcast_bytes(c, vec![r as u8 + 7; 3 - r], 0).unwrap();
        assert_eq!(from0, [7, 7, 7], "rank {r}");
        Collective::<CpuBackend>::barrier(c).unwrap();
        (h, g, w, bytes)
    });
    for (r, (h, g, w, bytes)) in out.into_iter().enumerate() {
        assert_eq!(
            h.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            fold.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "rank {r}, seed {s}"
        );
        if r == 2 {
            assert_eq!(
                g.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                sum_to_2.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "seed {s}"
            );
        } else {
            assert_eq!(g, grads[r], "rank {r}: a non-root keeps its own values");
        }
        assert_eq!(w, grads[1][..7], "rank {r}");
        assert_eq!(bytes, b"settings of rank 2", "rank {r}");
    }
}

impl HostCollective {
    fn all_reduce_host_checked(&self, v: &mut [f64]) {
        Collective::<CpuBackend>::all_reduce_host(self, v).unwrap()
    }
}

#[test]
fn a_rank_that_calls_another_operation_is_named_on_every_rank() {
    let out = on_all(group(3, Duration::from_secs(10)), |r, c| {
        let be = CpuBackend;
        if r == 2 {
            let mut b = be.upload(&[0.5; 12], Role::Param).unwrap();
            Collective::<CpuBackend>::broadcast(c, &be, &mut [&mut b], 0)
        } else {
            let mut b = be.upload(&[0.25; 40], Role::Grad).unwrap();
            Collective::<CpuBackend>::all_reduce_sum(c, &be, &mut [&mut b])
        }
        .unwrap_err()
        .to_string()
    });
    for (r, e) in out.iter().enumerate() {
        assert_eq!(
            e,
            "rank 2: called broadcast (12 values) where rank 0 called all_reduce_sum (40 values)",
            "rank {r}"
        );
    }
}

#[test]
fn a_rank_that_drops_its_collective_is_named_by_the_others_within_a_second() {
    for dead in [1, 0] {
        let t = Instant::now();
        let out = on_all(group(3, Duration::from_secs(30)), move |r, c| {
            if r == dead {
                return None;
            }
            let be = CpuBackend;
            let mut b = be.upload(&[1.5; 8], Role::Grad).unwrap();
            let e = Collective::<CpuBackend>::all_reduce_sum(c, &be, &mut [&mut b]).unwrap_err();
            // Every later call fails the same way, at once.
            let again = Collective::<CpuBackend>::barrier(c).unwrap_err();
            assert_eq!(again.to_string(), e.to_string());
            Some(e)
        });
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        for (r, e) in out.into_iter().enumerate() {
            if r == dead {
                continue;
            }
            let e = e.unwrap();
            assert!(
                matches!(e, DistError::Peer { rank, .. } if rank == dead),
                "rank {r}: {e}"
            );
            assert_eq!(
                e.to_string(),
                format!(
                    "rank {dead}: closed its connection: it exited or failed; see its own error"
                ),
                "rank {r}"
            );
        }
    }
}

#[test]
fn a_silent_rank_is_named_after_the_timeout() {
    let t = Instant::now();
    let out = on_all(group(3, Duration::from_millis(300)), |r, c| {
        if r == 2 {
            // Alive but never calls: hold the connection past the others' waits.
            thread::sleep(Duration::from_millis(1500));
            return String::new();
        }
        Collective::<CpuBackend>::barrier(c)
            .unwrap_err()
            .to_string()
    });
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    for e in &out[..2] {
        assert_eq!(
            e,
            "rank 2: sent nothing for 0.3 s (TOPCOAT_COLLECTIVE_TIMEOUT sets the wait)"
        );
    }
}

#[test]
fn one_rank_is_the_identity() {
    let c = group(1, Duration::from_secs(1)).pop().unwrap();
    let be = CpuBackend;
    let mut b = be.upload(&[3.5, -1.25], Role::Grad).unwrap();
    Collective::<CpuBackend>::all_reduce_sum(&c, &be, &mut [&mut b]).unwrap();
    assert_eq!(b, vec![3.5, -1.25]);
    let mut h = [2.0];
    c.all_reduce_host_checked(&mut h);
    assert_eq!(h, [2.0]);
}

/// Throughput of one all_reduce_sum of 16M values (64 MiB) over 3 ranks on loopback; run with
/// `cargo test --release --lib dist::host::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput_of_a_64_mib_all_reduce() {
    let n = 16 << 20;
    let out = on_all(group(3, Duration::from_secs(60)), move |r, c| {
        let be = CpuBackend;
        let mut b = be.upload(&vec![r as f32 + 0.5; n], Role::Grad).unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            Collective::<CpuBackend>::all_reduce_sum(c, &be, &mut [&mut b]).unwrap();
        }
        (t.elapsed() / 3, b[n - 1])
    });
    let took = out.iter().map(|o| o.0).max().unwrap();
    println!(
        "all_reduce_sum of {n} f32 over 3 ranks: {:.1} ms ({:.2} GB/s of values per rank)",
        took.as_secs_f64() * 1e3,
        (n * 4) as f64 / took.as_secs_f64() / 1e9
    );
    assert!(out.iter().all(|o| o.1 > 0.0));
}
