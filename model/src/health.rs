//! Balancer health as a data plane reports it: per upstream, per target,
//! per resolved address. The data plane produces it, the Admin API renders
//! it in Kong's `/upstreams/{id}/health` shape (and the sync stream will
//! carry it), so both sides share these types.

/// One upstream's balancer.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamHealth {
    /// Active or passive checks are configured; otherwise every address
    /// reports `HEALTHCHECKS_OFF`.
    pub healthchecks: bool,
    /// The available weight exceeds the upstream's threshold.
    pub healthy: bool,
    pub weight: Weight,
    pub targets: Vec<TargetHealth>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TargetHealth {
    /// `host:port`, as the target entity has it.
    pub target: String,
    pub host: String,
    pub port: u16,
    /// The record type that resolved the host (`A`, `AAAA`, `SRV`), or the
    /// DNS error.
    pub dns: String,
    pub node_weight: u32,
    pub weight: Weight,
    pub addresses: Vec<AddressHealth>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AddressHealth {
    pub ip: String,
    pub port: u16,
    pub weight: u32,
    pub healthy: bool,
}

/// Weights summed over addresses, split by availability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Weight {
    pub total: u64,
    pub available: u64,
    pub unavailable: u64,
}

impl Weight {
    /// Count an address of `weight`.
    pub fn add(&mut self, weight: u32, available: bool) {
        self.total += u64::from(weight);
        if available {
            self.available += u64::from(weight);
        } else {
            self.unavailable += u64::from(weight);
        }
    }
}
