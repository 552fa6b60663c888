//! Consistent hashing on a Ketama ring (Pingora's, compatible with nginx's): a key keeps its
//! backend while the pool changes, and only about 1/n of keys move when a backend joins or
//! leaves. An unusable backend's keys go to the next backend on the ring.
//!
//! Slow start: a ramping backend owns only a fraction of its keys, equal to its share; the
//! others go on to the next backend on the ring. Which keys it keeps is decided by a hash of
//! the key, so as the share grows keys only join it, and each key stays where it is between
//! requests.

use std::net::SocketAddr;

use pingora_ketama::{Bucket, Continuum};

use super::{BackendId, BackendView, Balancer};

/// Ketama ring over a pool's backends (weights set the number of points).
pub struct ConsistentHash {
    ring: Continuum,
    addresses: Vec<SocketAddr>,
    points: usize,
}

impl ConsistentHash {
    /// A ring over `(address, configured weight)` in backend order.
    pub fn new(backends: &[(SocketAddr, u32)]) -> Self {
        let buckets: Vec<Bucket> = backends
            .iter()
            .map(|(address, weight)| Bucket::new(*address, (*weight).max(1)))
            .collect();
        Self {
            ring: Continuum::new(&buckets),
            addresses: backends.iter().map(|(a, _)| *a).collect(),
            points: backends.iter().map(|(_, w)| *w as usize * 160).sum(),
        }
    }
}

impl Balancer for ConsistentHash {
    fn select(&self, view: &dyn BackendView, key: Option<&[u8]>) -> Option<BackendId> {
        let Some(key) = key else {
            // No key for this request (e.g. the header is missing): any usable backend.
            let n = view.len();
            let start = fastrand::usize(..n.max(1));
            return (0..n).map(|i| (start + i) % n).find(|id| view.usable(*id));
        };
        let ramp_point = key_point(key);
        self.owners(key)
            .find(|id| view.usable(*id) && ramp_point < view.share(*id))
            // Only ramping backends are usable and none keeps this key: the first anyway.
            .or_else(|| self.owners(key).find(|id| view.usable(*id)))
    }
}

impl ConsistentHash {
    /// The backends in ring order from `key`'s point.
    fn owners<'a>(&'a self, key: &'a [u8]) -> impl Iterator<Item = BackendId> + 'a {
        self.ring
            .node_iter(key)
            .take(self.points)
            .filter_map(|address| self.addresses.iter().position(|a| a == address))
    }
}

/// Where `key` falls in [0, 1), independently of the ring's own hash (FNV-1a, 64 bits, with
/// MurmurHash3's finalizer so similar keys spread evenly).
fn key_point(key: &[u8]) -> f64 {
    let mut h = key.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::FixedView;

    fn addresses(n: usize) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| (SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)), 1))
            .collect()
    }

    fn owners(ring: &ConsistentHash, view: &FixedView, keys: usize) -> Vec<SocketAddr> {
        (0..keys)
            .map(|k| {
                let id = ring
                    .select(view, Some(format!("user-{k}").as_bytes()))
                    .unwrap();
                ring.addresses[id]
            })
            .collect()
    }

    #[test]
    fn the_same_key_goes_to_the_same_backend() {
        let ring = ConsistentHash::new(&addresses(4));
        let view = FixedView::weighted(&[1; 4]);
        assert_eq!(owners(&ring, &view, 100), owners(&ring, &view, 100));
    }

    #[test]
    fn adding_a_backend_moves_few_keys() {
        let keys = 10_000;
        let before = ConsistentHash::new(&addresses(4));
        let after = ConsistentHash::new(&addresses(5));
        let a = owners(&before, &FixedView::weighted(&[1; 4]), keys);
        let b = owners(&after, &FixedView::weighted(&[1; 5]), keys);
        let moved = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        // Ideal is 1/5 of the keys, all of them to the new backend.
        assert!(moved < keys * 3 / 10, "{moved} of {keys} keys moved");
        let new = addresses(5)[4].0;
        assert!(a.iter().zip(&b).all(|(x, y)| x == y || *y == new));
    }

    #[test]
    fn an_unusable_backend_only_moves_its_own_keys() {
        let ring = ConsistentHash::new(&addresses(4));
        let mut view = FixedView::weighted(&[1; 4]);
        let before = owners(&ring, &view, 5_000);
        view.down = vec![2];
        let after = owners(&ring, &view, 5_000);
        let down = ring.addresses[2];
        for (x, y) in before.iter().zip(&after) {
            assert_ne!(*y, down);
            if *x != down {
                assert_eq!(x, y, "a key of a healthy backend moved");
            }
        }
        view.down = vec![0, 1, 2, 3];
        assert_eq!(ring.select(&view, Some(b"k")), None);
    }

    #[test]
    fn spreads_keys_roughly_evenly() {
        let ring = ConsistentHash::new(&addresses(4));
        let view = FixedView::weighted(&[1; 4]);
        let all = owners(&ring, &view, 20_000);
        for (address, _) in addresses(4) {
            let share = all.iter().filter(|a| **a == address).count();
            assert!((3_000..7_000).contains(&share), "{address}: {share}");
        }
    }

    #[test]
    fn a_ramping_backend_owns_a_growing_fraction_of_its_keys() {
        let ring = ConsistentHash::new(&addresses(4));
        let mut view = FixedView::weighted(&[1; 4]);
        let full = owners(&ring, &view, 10_000);
        let owner = ring.addresses[1];
        let owned = full.iter().filter(|a| **a == owner).count();
        let mut kept_before = 0;
        for share in [0.1, 0.5, 0.9] {
            view.shares = vec![1.0, share, 1.0, 1.0];
            let now = owners(&ring, &view, 10_000);
            let kept = now.iter().filter(|a| **a == owner).count();
            let expected = owned as f64 * share;
            assert!(
                (kept as f64 - expected).abs() < owned as f64 * 0.05,
                "share {share}: kept {kept} of {owned}"
            );
            assert!(kept > kept_before);
            kept_before = kept;
            // Only its own keys move, and none moves to it.
            for (x, y) in full.iter().zip(&now) {
                assert!(x == y || *x == owner, "a key of another backend moved");
            }
        }
    }
}
