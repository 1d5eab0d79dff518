//! Value parsers shared by the subcommands: each turns one option's text into the type the
//! options structs hold, or into a one-sentence [`CliError`] naming the option.

use std::path::PathBuf;

use vmm::{DriveConfig, NetConfig, RateLimiterConfig, TokenBucketConfig, VsockConfig};

use crate::cli::CliError;

/// A whole number for `option`.
pub(crate) fn number<T: std::str::FromStr>(
    option: &'static str,
    value: &str,
) -> Result<T, CliError> {
    value.parse().map_err(|_| CliError::NotANumber {
        option,
        value: value.to_string(),
    })
}

/// A size in bytes: digits, optionally followed by `K`, `M` or `G` (KiB, MiB, GiB).
pub(crate) fn size(option: &'static str, value: &str) -> Result<u64, CliError> {
    let bad = || CliError::Size {
        option,
        value: value.to_string(),
    };
    let (digits, unit) = match value.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => value.split_at(i),
        None => (value, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// `--huge-pages`: `none`, `2M` or `transparent` (any case).
pub(crate) fn huge_pages(value: &str) -> Result<vmm::HugePages, CliError> {
    match value.to_ascii_lowercase().as_str() {
        "none" => Ok(vmm::HugePages::None),
        "2m" => Ok(vmm::HugePages::Size2M),
        "transparent" => Ok(vmm::HugePages::Transparent),
        _ => Err(CliError::HugePages(value.to_string())),
    }
}

/// A per-second rate given as `key=N` to `option`: a bucket of N tokens refilled in 1 s.
fn rate(
    option: &'static str,
    key: &'static str,
    value: &str,
) -> Result<TokenBucketConfig, CliError> {
    // Anything above this is no limit worth asking for; it also keeps the arithmetic small.
    const MAX: u64 = 1 << 50;
    match value.parse::<u64>() {
        Ok(n) if (1..=MAX).contains(&n) && !value.starts_with('+') => {
            Ok(TokenBucketConfig::per_second(n))
        }
        _ => Err(CliError::Rate {
            option,
            key,
            value: value.to_string(),
            max: MAX,
        }),
    }
}

/// `tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,bw=BYTES_PER_SEC][,mtu=N]`. `bw` limits each direction
/// (receive and transmit) to that many frame bytes a second; `mtu` is offered to the guest.
pub(crate) fn net(spec: &str) -> Result<NetConfig, CliError> {
    let mut tap = None;
    let mut mac = None;
    let mut bw = None;
    let mut mtu = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() && tap.is_none() => tap = Some(name),
            Some(("mac", m)) if mac.is_none() => {
                let parsed = vmm::parse_mac(m).map_err(CliError::NetMac)?;
                mac = Some(parsed);
            }
            Some(("bw", n)) if bw.is_none() => bw = Some(rate("--net", "bw", n)?),
            Some(("mtu", n)) if mtu.is_none() => {
                mtu = Some(n.parse::<u16>().map_err(|_| CliError::NotANumber {
                    option: "--net mtu=",
                    value: n.to_string(),
                })?)
            }
            _ => return Err(CliError::NetSpec(spec.to_string())),
        }
    }
    let tap = tap.ok_or_else(|| CliError::NetSpec(spec.to_string()))?;
    let limiter = bw.map(|b| RateLimiterConfig {
        bandwidth: Some(b),
        ops: None,
    });
    Ok(NetConfig {
        mac,
        rx_rate_limiter: limiter,
        tx_rate_limiter: limiter,
        mtu,
        ..NetConfig::new(tap)
    })
}

/// `cid=N,uds=PATH`.
pub(crate) fn vsock(spec: &str) -> Result<VsockConfig, CliError> {
    let bad = || CliError::VsockSpec(spec.to_string());
    let mut cid = None;
    let mut uds = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("cid", n)) if cid.is_none() => cid = Some(n.parse().map_err(|_| bad())?),
            Some(("uds", p)) if uds.is_none() && !p.is_empty() => uds = Some(PathBuf::from(p)),
            _ => return Err(bad()),
        }
    }
    Ok(VsockConfig {
        guest_cid: cid.ok_or_else(bad)?,
        uds_path: uds.ok_or_else(bad)?,
    })
}

/// `PATH[,ro][,root][,id=NAME][,bw=BYTES_PER_SEC][,iops=N]`.
pub(crate) fn disk(spec: &str) -> Result<DriveConfig, CliError> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or(CliError::DiskPath)?;
    let mut drive = DriveConfig::new(path);
    let mut limiter = RateLimiterConfig::default();
    for opt in parts {
        if limit("--disk", opt, &mut limiter)? {
            continue;
        }
        match (opt, opt.split_once('=')) {
            ("ro", _) => drive.read_only = true,
            ("root", _) => drive.root = true,
            (_, Some(("id", id))) => drive.id = Some(id.to_string()),
            _ => return Err(CliError::DiskOption(opt.to_string())),
        }
    }
    drive.rate_limiter = (!limiter.is_unlimited()).then_some(limiter);
    Ok(drive)
}

/// `flint boot --rootfs PATH`: shorthand for `--disk PATH,root` (the whole value is the path).
pub(crate) fn root_disk(path: &str) -> Result<DriveConfig, CliError> {
    Ok(DriveConfig {
        root: true,
        ..DriveConfig::new(path)
    })
}

/// The root disk of `flint run --rootfs IMAGE[,bw=BYTES_PER_SEC][,iops=N]`: the image and
/// its limits.
#[derive(Debug, Clone)]
pub(crate) struct RootImage {
    pub path: PathBuf,
    pub limiter: Option<RateLimiterConfig>,
}

pub(crate) fn root_image(spec: &str) -> Result<RootImage, CliError> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or(CliError::RootfsPath)?;
    let mut limiter = RateLimiterConfig::default();
    for opt in parts {
        if !limit("--rootfs", opt, &mut limiter)? {
            return Err(CliError::RootfsOption(opt.to_string()));
        }
    }
    Ok(RootImage {
        path: path.into(),
        limiter: (!limiter.is_unlimited()).then_some(limiter),
    })
}

/// Apply a block device's `bw=BYTES_PER_SEC` or `iops=N` option of `option` to `limiter`;
/// false when `opt` is neither.
fn limit(
    option: &'static str,
    opt: &str,
    limiter: &mut RateLimiterConfig,
) -> Result<bool, CliError> {
    match opt.split_once('=') {
        Some(("bw", n)) => limiter.bandwidth = Some(rate(option, "bw", n)?),
        Some(("iops", n)) => limiter.ops = Some(rate(option, "iops", n)?),
        _ => return Ok(false),
    }
    Ok(true)
}

/// `KEY=VALUE` for `--env`.
pub(crate) fn env(value: &str) -> Result<(String, String), CliError> {
    match value.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') => Ok((k.to_string(), v.to_string())),
        _ => Err(CliError::EnvSpec {
            option: "--env",
            value: value.to_string(),
        }),
    }
}

/// An absolute path inside the guest.
pub(crate) fn guest_path(path: &str) -> Result<String, CliError> {
    if path.starts_with('/') {
        Ok(path.to_string())
    } else {
        Err(CliError::GuestPath(path.to_string()))
    }
}
