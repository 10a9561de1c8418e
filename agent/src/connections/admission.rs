//! Caps on what peers may hold open at once: connections (TCP and QUIC) and data-plane
//! sessions, per agent and per client address. A [`Permit`] is held for as long as the
//! connection or session lives and gives its place back when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a peer was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The agent holds as many as it allows.
    #[error("this agent has {0} open, as many as it allows")]
    AgentFull(usize),
    /// This client address holds as many as it may.
    #[error("this address has {0} open, as many as one address may")]
    AddressFull(usize),
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// One kind of place (connections, or sessions) with its two caps.
#[derive(Debug, Clone)]
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    counts: Arc<Mutex<Counts>>,
}

impl Admission {
    /// At most `max_total` at once, `max_per_ip` from one address.
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self {
            max_total: max_total.max(1),
            max_per_ip: max_per_ip.max(1),
            counts: Arc::default(),
        }
    }

    /// Takes a place for `ip`, or says which cap is reached.
    pub fn admit(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        let ip = crate::connection::canonical_ip(ip);
        let mut counts = self.counts.lock().expect("admission lock poisoned");
        if counts.total >= self.max_total {
            return Err(Refusal::AgentFull(counts.total));
        }
        let held = counts.by_ip.entry(ip).or_insert(0);
        if *held >= self.max_per_ip {
            return Err(Refusal::AddressFull(*held));
        }
        *held += 1;
        counts.total += 1;
        Ok(Permit {
            ip,
            counts: Arc::clone(&self.counts),
        })
    }

    /// Places held now (all addresses).
    pub fn held(&self) -> usize {
        self.counts.lock().expect("admission lock poisoned").total
    }
}

/// A place held; dropping it gives the place back.
#[derive(Debug)]
pub struct Permit {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(held) = counts.by_ip.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                counts.by_ip.remove(&self.ip);
            }
        }
    }
}

/// File descriptors this process may open (the soft `RLIMIT_NOFILE`), when known.
pub fn open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct it is given, which lives here.
        #[allow(unsafe_code)]
        let status = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        (status == 0).then_some(limit.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_agent_and_per_address_and_places_come_back() {
        let admission = Admission::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).unwrap_err(), Refusal::AddressFull(2));
        let _third = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).unwrap_err(), Refusal::AgentFull(3));
        drop(first);
        assert_eq!(admission.held(), 2);
        assert!(admission.admit(a).is_ok());
        // An IPv4-mapped IPv6 address is the same client.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let _again = admission.admit(a);
        assert!(admission.admit(mapped).is_err());
    }
}
