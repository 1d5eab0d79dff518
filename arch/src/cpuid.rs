//! CPUID normalisation: turn what `KVM_GET_SUPPORTED_CPUID` reports into what one vCPU of a
//! flint guest should see.
//!
//! The topology presented is one package of `vcpu_count` logical processors: one thread per
//! core, or two with simultaneous multithreading (`smt`, for an even count); the (x2)APIC ID
//! of a vCPU is its index, matching the MP table, so the two threads of core `n` are vCPUs
//! `2n` and `2n + 1`.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 0x1: XSAVE (ecx bit 26), hypervisor present (ecx bit 31), HTT (edx bit 28).
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x1 ebx bits 15-8: CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_SIZE: u32 = 8;
/// Leaf 0x8000_0001 ecx bit 22: topology extensions (leaves 0x8000_001D/0x8000_001E), how
/// an AMD guest learns its threads per core.
const LEAF_8000_0001_ECX_TOPOEXT: u32 = 1 << 22;
/// Leaf 0x6 eax bit 2: APIC timer always running (ARAT).
const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// Leaf 0xB/0x1F level types (ecx bits 15-8).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of bits needed to hold an index below `count`: ceil(log2(count)), 0 for 0 and 1.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (count - 1).leading_zeros()
    }
}

/// Leaf 0x1: APIC ID, logical processor count, CLFLUSH size, HTT and hypervisor bits.
fn leaf_0x1(entry: &mut kvm_cpuid_entry2, vcpu_id: u32, vcpu_count: u32) {
    // Keep the brand index in bits 7-0.
    entry.ebx =
        (entry.ebx & 0xff) | (CLFLUSH_LINE_SIZE << 8) | (vcpu_count << 16) | (vcpu_id << 24);
    if vcpu_count > 1 {
        entry.edx |= LEAF1_EDX_HTT;
    } else {
        entry.edx &= !LEAF1_EDX_HTT;
    }
    entry.ecx |= LEAF1_ECX_HYPERVISOR;
}

/// Leaf 0x4 (deterministic cache parameters, every subleaf): cores per package and threads
/// sharing each cache. L1 and L2 are private to a core (shared by its threads); L3 is shared
/// by the whole package.
fn leaf_0x4(entry: &mut kvm_cpuid_entry2, vcpu_count: u32, threads: u32) {
    // Cache type 0: no more caches; leave the terminating subleaf alone.
    if entry.eax & 0x1f == 0 {
        return;
    }
    let level = (entry.eax >> 5) & 0x7;
    // Bits 31-26: addressable core IDs - 1 (6 bits).
    let cores = (vcpu_count / threads).saturating_sub(1).min(0x3f);
    // Bits 25-14: addressable logical processor IDs sharing this cache - 1 (12 bits).
    let sharing = if level >= 3 {
        vcpu_count.saturating_sub(1).min(0xfff)
    } else {
        threads - 1
    };
    entry.eax = (entry.eax & 0x3fff) | (cores << 26) | (sharing << 14);
}

/// Leaves 0xB and 0x1F (extended topology): an SMT level of `threads` threads, a core level
/// of `vcpu_count` logical processors, and invalid levels above; edx is the x2APIC ID
/// everywhere.
fn leaf_extended_topology(
    entry: &mut kvm_cpuid_entry2,
    vcpu_id: u32,
    vcpu_count: u32,
    threads: u32,
) {
    let subleaf = entry.index;
    match subleaf {
        0 => {
            entry.eax = id_bits(threads);
            entry.ebx = threads;
            entry.ecx = (LEVEL_TYPE_SMT << 8) | subleaf;
        }
        1 => {
            entry.eax = id_bits(vcpu_count);
            entry.ebx = vcpu_count;
            entry.ecx = (LEVEL_TYPE_CORE << 8) | subleaf;
        }
        _ => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = subleaf & 0xff;
        }
    }
    entry.edx = vcpu_id;
}

/// Normalise the supported CPUID entries for vCPU `vcpu_id` of `vcpu_count`, with
/// `threads_per_core` threads per core (1, or 2 with SMT; any other value, or a count it does
/// not divide, is taken as 1):
/// - leaf 0x1: initial APIC ID = vcpu_id, logical processor count, CLFLUSH size, HTT when
///   vcpu_count > 1, the hypervisor bit set, TSC-deadline as KVM reports;
/// - leaf 0x4 / 0xB / 0x1F (Intel) and 0x8000_001E (AMD) topology: `threads_per_core`
///   threads per core, `vcpu_count / threads_per_core` cores in one package, x2APIC IDs =
///   vcpu_id;
/// - leaf 0x6: no power management that flint cannot emulate;
/// - leaf 0xA: no architectural PMU;
/// - leaf 0xD: consistent with leaf 1 (no XSAVE in leaf 1 → leaf 0xD zeroed; otherwise sizes as
///   reported);
/// - leaf 0x4000_0000..: KVM signature and features left as reported.
///
/// In detail:
/// - 0x4: eax bits 31-26 = min(cores, 64) - 1; bits 25-14 = threads_per_core - 1 for L1/L2
///   and vcpu_count - 1 for L3 and beyond;
/// - 0xB / 0x1F: subleaf 0 is the SMT level (shift ceil(log2(threads_per_core)),
///   threads_per_core logical processors), subleaf 1 the core level (shift
///   ceil(log2(vcpu_count)), vcpu_count logical processors), higher subleaves are invalid
///   levels;
/// - 0x6: only ARAT kept in eax, ecx cleared;
/// - 0x8000_0008: ecx NC (bits 7-0) = vcpu_count - 1 and ApicIdSize (bits 15-12) =
///   ceil(log2(vcpu_count));
/// - 0x8000_001D: as 0x4 for the sharing count (bits 25-14), bits 31-26 kept;
/// - 0x8000_001E: eax = extended APIC ID = vcpu_id, ebx = compute unit
///   vcpu_id / threads_per_core with threads_per_core threads, ecx = node 0 of 1;
/// - 0x8000_0001: with more than one thread per core and leaf 0x8000_001E present, ecx
///   TOPOEXT set, so that an AMD guest reads its threads per core there.
///
/// Leaves that are absent are not added; leaves not listed are left unchanged.
pub fn normalize(
    entries: &mut [kvm_cpuid_entry2],
    vcpu_id: u8,
    vcpu_count: u8,
    threads_per_core: u8,
) {
    let vcpu_id = u32::from(vcpu_id);
    let vcpu_count = u32::from(vcpu_count);
    let threads = match u32::from(threads_per_core) {
        2 if vcpu_count % 2 == 0 => 2,
        _ => 1,
    };
    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => leaf_0x1(entry, vcpu_id, vcpu_count),
            0x4 => leaf_0x4(entry, vcpu_count, threads),
            0x6 => {
                entry.eax &= LEAF6_EAX_ARAT;
                entry.ecx = 0;
            }
            0xa => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0xb | 0x1f => leaf_extended_topology(entry, vcpu_id, vcpu_count, threads),
            // AMD's cache topology: as leaf 0x4 without the core count.
            0x8000_001d => {
                let cores = entry.eax & (0x3f << 26);
                leaf_0x4(entry, vcpu_count, threads);
                entry.eax = (entry.eax & !(0x3f << 26)) | cores;
            }
            0x8000_0008 => {
                let nc = vcpu_count.saturating_sub(1) & 0xff;
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(vcpu_count) << 12) | nc;
            }
            0x8000_001e => {
                entry.eax = vcpu_id;
                // Bits 15-8: threads per compute unit - 1; bits 7-0: compute unit ID.
                entry.ebx = ((threads - 1) << 8) | ((vcpu_id / threads) & 0xff);
                // Bits 10-8: nodes per processor - 1 = 0; bits 7-0: node ID 0.
                entry.ecx = 0;
            }
            _ => {}
        }
    }

    // An AMD guest counts threads per core from leaf 0x8000_001E only when topology
    // extensions are advertised (Linux before 6.2 reads nothing else there).
    let amd_topology = entries.iter().any(|e| e.function == 0x8000_001e);
    if threads > 1 && amd_topology {
        for entry in entries.iter_mut().filter(|e| e.function == 0x8000_0001) {
            entry.ecx |= LEAF_8000_0001_ECX_TOPOEXT;
        }
    }

    // Leaf 0xD only makes sense when leaf 1 advertises XSAVE.
    let xsave = entries
        .iter()
        .any(|e| e.function == 0x1 && e.ecx & LEAF1_ECX_XSAVE != 0);
    if !xsave {
        for entry in entries.iter_mut().filter(|e| e.function == 0xd) {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KVM_CPUID_FLAG_SIGNIFCANT_INDEX.
    const SIGNIFICANT_INDEX: u32 = 1;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 0x4 | 0xb | 0xd | 0x1f) {
                SIGNIFICANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    /// A host-like supported CPUID list (numbers loosely from a 16-core Intel part).
    fn host_entries() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(0x1, 0, [0x000a_0671, 0x2b10_0800, 0xf7fa_3223, 0x0f8b_fbff]),
            // L1d, L1i, L2, L3, terminator.
            entry(0x4, 0, [0x1c00_4121, 0x02c0_003f, 0x3f, 0]),
            entry(0x4, 1, [0x1c00_4122, 0x01c0_003f, 0x3f, 0]),
            entry(0x4, 2, [0x1c00_4143, 0x03c0_003f, 0x3ff, 0]),
            entry(0x4, 3, [0x1c03_c163, 0x03c0_003f, 0x7fff, 4]),
            entry(0x4, 4, [0, 0, 0, 0]),
            entry(0x6, 0, [0x0000_00f7, 0x2, 0x9, 0]),
            entry(0x7, 0, [0, 0x029c_6fbf, 0x4040_0004, 0xbc00_0400]),
            entry(0xa, 0, [0x0803_0805, 0, 0, 0x0603]),
            entry(0xb, 0, [1, 2, 0x100, 0x2b]),
            entry(0xb, 1, [5, 16, 0x201, 0x2b]),
            entry(0xb, 2, [0, 0, 2, 0x2b]),
            entry(0xd, 0, [0x207, 0x340, 0xa88, 0]),
            entry(0xd, 1, [0xf, 0x340, 0, 0]),
            entry(0xd, 2, [0x100, 0x240, 0, 0]),
            entry(0x1f, 0, [1, 2, 0x100, 0x2b]),
            entry(0x1f, 1, [5, 16, 0x201, 0x2b]),
            entry(0x1f, 2, [0, 0, 2, 0x2b]),
            entry(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(0x4000_0001, 0, [0x0100_7afb, 0, 0, 1]),
            entry(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            entry(0x8000_0008, 0, [0x3027, 0, 0x7007, 0]),
            entry(0x8000_001d, 0, [0x0000_4121, 0x01c0_003f, 0x3f, 0]),
            entry(0x8000_001d, 3, [0x0003_c163, 0x03c0_003f, 0x7fff, 1]),
            entry(0x8000_001e, 0, [0x2b, 0x0115, 0x0301, 0]),
        ]
    }

    fn normalized(vcpu_id: u8, vcpu_count: u8) -> Vec<kvm_cpuid_entry2> {
        let mut entries = host_entries();
        normalize(&mut entries, vcpu_id, vcpu_count, 1);
        entries
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(id_bits(0), 0);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(254), 8);
        assert_eq!(id_bits(255), 8);
    }

    #[test]
    fn leaf_1_single_vcpu() {
        let e = find(&normalized(0, 1), 0x1, 0);
        assert_eq!(e.ebx, 0x0001_0800);
        assert_eq!(e.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(e.ecx & LEAF1_ECX_HYPERVISOR, LEAF1_ECX_HYPERVISOR);
        // Other feature bits untouched (TSC-deadline bit 24 as reported).
        assert_eq!(e.ecx, 0xf7fa_3223);
        assert_eq!(e.eax, 0x000a_0671);
        assert_eq!(e.edx, 0x0f8b_fbff & !LEAF1_EDX_HTT);
    }

    #[test]
    fn leaf_1_four_vcpus() {
        for id in 0..4 {
            let e = find(&normalized(id, 4), 0x1, 0);
            assert_eq!(e.ebx >> 24, u32::from(id));
            assert_eq!((e.ebx >> 16) & 0xff, 4);
            assert_eq!((e.ebx >> 8) & 0xff, 8);
            assert_eq!(e.ebx & 0xff, 0);
            assert_eq!(e.edx & LEAF1_EDX_HTT, LEAF1_EDX_HTT);
            assert_eq!(e.ecx & LEAF1_ECX_HYPERVISOR, LEAF1_ECX_HYPERVISOR);
        }
    }

    #[test]
    fn leaf_1_keeps_brand_index_and_sets_hypervisor() {
        let mut entries = vec![entry(0x1, 0, [0, 0xffff_ff05, 0, LEAF1_EDX_HTT])];
        normalize(&mut entries, 3, 1, 1);
        assert_eq!(entries[0].ebx, 0x0301_0805);
        assert_eq!(entries[0].ecx, LEAF1_ECX_HYPERVISOR);
        assert_eq!(entries[0].edx, 0);
    }

    #[test]
    fn leaf_4_topology() {
        for (count, cores_field) in [(1u8, 0u32), (4, 3)] {
            let entries = normalized(0, count);
            for sub in 0..3 {
                let e = find(&entries, 0x4, sub);
                assert_eq!(e.eax >> 26, cores_field, "subleaf {sub}");
                assert_eq!((e.eax >> 14) & 0xfff, 0, "subleaf {sub}");
                // Type, level and the other low bits kept.
                assert_eq!(e.eax & 0x3fff, find(&host_entries(), 0x4, sub).eax & 0x3fff);
            }
            let l3 = find(&entries, 0x4, 3);
            assert_eq!((l3.eax >> 5) & 7, 3);
            assert_eq!(l3.eax >> 26, cores_field);
            assert_eq!((l3.eax >> 14) & 0xfff, u32::from(count) - 1);
            assert_eq!(l3.eax & 0x3fff, 0x0163);
            // ebx/ecx/edx (geometry) untouched.
            assert_eq!(l3.ebx, 0x03c0_003f);
            assert_eq!(l3.ecx, 0x7fff);
            assert_eq!(find(&entries, 0x4, 4).eax, 0);
        }
    }

    #[test]
    fn leaf_4_clamps_large_counts() {
        let entries = normalized(200, 254);
        let l3 = find(&entries, 0x4, 3);
        assert_eq!(l3.eax >> 26, 0x3f);
        assert_eq!((l3.eax >> 14) & 0xfff, 253);
    }

    #[test]
    fn extended_topology_single_vcpu() {
        let entries = normalized(0, 1);
        for leaf in [0xb, 0x1f] {
            let smt = find(&entries, leaf, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 0));
            let core = find(&entries, leaf, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (0, 1, 0x201, 0));
            let invalid = find(&entries, leaf, 2);
            assert_eq!(
                (invalid.eax, invalid.ebx, invalid.ecx, invalid.edx),
                (0, 0, 2, 0)
            );
        }
    }

    #[test]
    fn extended_topology_four_vcpus() {
        for id in 0..4u8 {
            let entries = normalized(id, 4);
            let id = u32::from(id);
            for leaf in [0xb, 0x1f] {
                let smt = find(&entries, leaf, 0);
                assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, id));
                let core = find(&entries, leaf, 1);
                assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, id));
                let invalid = find(&entries, leaf, 2);
                assert_eq!(
                    (invalid.eax, invalid.ebx, invalid.ecx, invalid.edx),
                    (0, 0, 2, id)
                );
                // The package ID derived from the core shift is 0 for every vCPU.
                assert_eq!(id >> core.eax, 0);
            }
        }
    }

    #[test]
    fn extended_topology_odd_count() {
        let mut entries = vec![entry(0xb, 1, [0; 4]), entry(0xb, 5, [9; 4])];
        normalize(&mut entries, 2, 3, 1);
        assert_eq!(entries[0].eax, 2);
        assert_eq!(entries[0].ebx, 3);
        assert_eq!(entries[1].ecx, 5);
        assert_eq!(entries[1].eax, 0);
        assert_eq!(entries[1].edx, 2);
    }

    #[test]
    fn leaf_6_power_management() {
        let e = find(&normalized(0, 1), 0x6, 0);
        assert_eq!(e.eax, LEAF6_EAX_ARAT);
        assert_eq!(e.ecx, 0);
        let mut entries = vec![entry(0x6, 0, [0xfb, 0, 0xf, 0])];
        normalize(&mut entries, 0, 1, 1);
        assert_eq!(entries[0].eax, 0);
        assert_eq!(entries[0].ecx, 0);
    }

    #[test]
    fn leaf_a_no_pmu() {
        let e = find(&normalized(1, 2), 0xa, 0);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
    }

    #[test]
    fn leaf_d_kept_with_xsave() {
        let entries = normalized(0, 2);
        let host = host_entries();
        for sub in 0..3 {
            assert_eq!(find(&entries, 0xd, sub), find(&host, 0xd, sub));
        }
    }

    #[test]
    fn leaf_d_zeroed_without_xsave() {
        let mut entries = host_entries();
        for e in entries.iter_mut().filter(|e| e.function == 1) {
            e.ecx &= !LEAF1_ECX_XSAVE;
        }
        normalize(&mut entries, 0, 2, 1);
        for sub in 0..3 {
            let e = find(&entries, 0xd, sub);
            assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0), "subleaf {sub}");
            assert_eq!(e.flags, SIGNIFICANT_INDEX);
        }
        // Without any leaf 1 there is no XSAVE either.
        let mut entries = vec![entry(0xd, 0, [0x207, 0x340, 0xa88, 0])];
        normalize(&mut entries, 0, 1, 1);
        assert_eq!(entries[0].eax, 0);
    }

    #[test]
    fn amd_leaves() {
        let entries = normalized(3, 4);
        assert_eq!(
            find(&entries, 0x8000_0001, 0),
            find(&host_entries(), 0x8000_0001, 0)
        );
        let e = find(&entries, 0x8000_0008, 0);
        assert_eq!(e.ecx & 0xff, 3);
        assert_eq!((e.ecx >> 12) & 0xf, 2);
        assert_eq!(e.eax, 0x3027);
        let e = find(&entries, 0x8000_001e, 0);
        assert_eq!(e.eax, 3);
        assert_eq!(e.ebx, 3);
        assert_eq!(e.ecx, 0);

        let entries = normalized(0, 1);
        let e = find(&entries, 0x8000_0008, 0);
        assert_eq!(e.ecx & 0xf0ff, 0);
        let e = find(&entries, 0x8000_001e, 0);
        assert_eq!((e.eax, e.ebx, e.ecx), (0, 0, 0));
    }

    #[test]
    fn other_leaves_untouched() {
        let entries = normalized(2, 4);
        let host = host_entries();
        for function in [0x0, 0x7, 0x4000_0000, 0x4000_0001] {
            assert_eq!(find(&entries, function, 0), find(&host, function, 0));
        }
        assert_eq!(entries.len(), host.len());
    }

    #[test]
    fn smt_presents_two_threads_per_core() {
        for id in 0..4u8 {
            let mut entries = host_entries();
            normalize(&mut entries, id, 4, 2);
            // Intel: the SMT level holds 2 threads (shift 1), the core level all 4.
            let smt = find(&entries, 0xb, 0);
            assert_eq!(
                (smt.eax, smt.ebx, smt.ecx >> 8 & 0xff),
                (1, 2, LEVEL_TYPE_SMT)
            );
            assert_eq!(smt.edx, u32::from(id));
            let core = find(&entries, 0xb, 1);
            assert_eq!(
                (core.eax, core.ebx, core.ecx >> 8 & 0xff),
                (2, 4, LEVEL_TYPE_CORE)
            );
            assert_eq!(find(&entries, 0x1f, 0).ebx, 2);
            // Two cores; L1 and L2 shared by the core's 2 threads, L3 by all 4.
            let l1 = find(&entries, 0x4, 0);
            assert_eq!((l1.eax >> 26, (l1.eax >> 14) & 0xfff), (1, 1));
            let l3 = find(&entries, 0x4, 3);
            assert_eq!((l3.eax >> 26, (l3.eax >> 14) & 0xfff), (1, 3));
            // AMD: compute unit id / 2 with 2 threads.
            let amd = find(&entries, 0x8000_001e, 0);
            assert_eq!(amd.ebx, (1 << 8) | u32::from(id / 2));
            assert_eq!(amd.eax, u32::from(id));
            // Leaf 1 still counts logical processors.
            assert_eq!(find(&entries, 0x1, 0).ebx >> 16 & 0xff, 4);
            // AMD: topology extensions on; L1 shared by 2 threads, L3 by all 4.
            assert_ne!(find(&entries, 0x8000_0001, 0).ecx & (1 << 22), 0);
            assert_eq!((find(&entries, 0x8000_001d, 0).eax >> 14) & 0xfff, 1);
            assert_eq!((find(&entries, 0x8000_001d, 3).eax >> 14) & 0xfff, 3);
        }
    }

    #[test]
    fn smt_is_ignored_where_it_cannot_apply() {
        // One vCPU, or an odd count: one thread per core, as without SMT.
        for (id, count) in [(0u8, 1u8), (2, 3)] {
            let mut with = host_entries();
            normalize(&mut with, id, count, 2);
            let mut without = host_entries();
            normalize(&mut without, id, count, 1);
            assert!(with
                .iter()
                .zip(&without)
                .all(|(a, b)| (a.eax, a.ebx, a.ecx, a.edx) == (b.eax, b.ebx, b.ecx, b.edx)));
        }
    }

    #[test]
    fn empty_list_and_zero_count_do_not_panic() {
        normalize(&mut [], 0, 1, 1);
        let mut entries = host_entries();
        normalize(&mut entries, 0, 0, 1);
        normalize(&mut entries, 255, 255, 1);
        let e = find(&entries, 0x1, 0);
        assert_eq!(e.ebx >> 24, 255);
    }
}

/// Leaf 0x1 ecx bit 24: the local APIC supports TSC-deadline mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Advertise the local APIC's TSC-deadline timer mode in leaf 1. KVM emulates it with an
/// in-kernel LAPIC (`KVM_CAP_TSC_DEADLINE_TIMER`) but `KVM_GET_SUPPORTED_CPUID` leaves the bit
/// to the VMM; with it a Linux guest needs no LAPIC timer calibration against the PIT.
pub fn enable_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for entry in entries.iter_mut().filter(|e| e.function == 0x1) {
        entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

/// The brand-string leaves, 0x8000_0002 to 0x8000_0004: 16 bytes of the processor's name each.
const BRAND_LEAVES: [u32; 3] = [0x8000_0002, 0x8000_0003, 0x8000_0004];

/// The host processor's brand string as its own CPUID instruction returns it (leaves
/// 0x8000_0002-0x8000_0004, eax..edx each), or `None` when the host has no such leaves.
pub fn host_brand_string() -> Option<[[u32; 4]; 3]> {
    use std::arch::x86_64::__cpuid;
    if __cpuid(0x8000_0000).eax < 0x8000_0004 {
        return None;
    }
    Some(BRAND_LEAVES.map(|leaf| {
        let r = __cpuid(leaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }))
}

/// Give the guest the processor's name: KVM's supported CPUID list leaves the brand-string
/// leaves empty (all zero), and a Linux guest then names its CPU by family and model alone
/// (`model name : 17/01` in `/proc/cpuinfo`). Each brand leaf that is present and empty gets
/// the host's value from `brand`; a leaf with a string already is left alone, and no leaf is
/// added (the extended leaves KVM lists are the ones the guest sees).
pub fn fill_brand_string(entries: &mut [kvm_cpuid_entry2], brand: &[[u32; 4]; 3]) {
    for entry in entries.iter_mut() {
        let Some(i) = BRAND_LEAVES.iter().position(|&leaf| leaf == entry.function) else {
            continue;
        };
        if entry.eax | entry.ebx | entry.ecx | entry.edx == 0 {
            [entry.eax, entry.ebx, entry.ecx, entry.edx] = brand[i];
        }
    }
}

/// The XCR0 value that enables every state component the (normalised) CPUID offers: leaf 0xD
/// subleaf 0 EAX/EDX. `None` when leaf 1 has no XSAVE or there is no leaf 0xD.
///
/// Starting a vCPU with this XCR0 keeps leaf 0xD's "size for the enabled components" (which
/// KVM derives from its view of XCR0) equal to what the guest kernel computes from the
/// per-component leaves, even on a host that does not trap the guest's own XSETBV.
pub fn supported_xcr0(entries: &[kvm_cpuid_entry2]) -> Option<u64> {
    let leaf1 = entries.iter().find(|e| e.function == 0x1)?;
    if leaf1.ecx & LEAF1_ECX_XSAVE == 0 {
        return None;
    }
    let leaf_d = entries.iter().find(|e| e.function == 0xd && e.index == 0)?;
    let xcr0 = u64::from(leaf_d.eax) | (u64::from(leaf_d.edx) << 32);
    // x87 state is architecturally always enabled.
    Some(xcr0 | 1)
}

#[cfg(test)]
mod xcr0_tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn xcr0_follows_leaf_0xd_when_xsave_is_offered() {
        let entries = [
            entry(0x1, 0, 0, LEAF1_ECX_XSAVE, 0),
            entry(0xd, 0, 0x7, 0, 0x0),
        ];
        assert_eq!(supported_xcr0(&entries), Some(0x7));
        let high = [
            entry(0x1, 0, 0, LEAF1_ECX_XSAVE, 0),
            entry(0xd, 0, 0x3, 0, 0x1),
        ];
        assert_eq!(supported_xcr0(&high), Some(0x1_0000_0003));
    }

    #[test]
    fn tsc_deadline_is_set_in_leaf_1_only() {
        let mut entries = [entry(0x1, 0, 0, 0, 0), entry(0x7, 0, 0, 0, 0)];
        enable_tsc_deadline(&mut entries);
        assert_eq!(entries[0].ecx, LEAF1_ECX_TSC_DEADLINE);
        assert_eq!(entries[1].ecx, 0);
    }

    #[test]
    fn empty_brand_leaves_get_the_hosts_name_and_others_stay() {
        // "AMD EPYC Processor" padded with NULs, as 12 little-endian words.
        let mut bytes = [0u8; 48];
        bytes[..18].copy_from_slice(b"AMD EPYC Processor");
        let word = |i: usize| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
        let brand = [
            [word(0), word(1), word(2), word(3)],
            [word(4), word(5), word(6), word(7)],
            [word(8), word(9), word(10), word(11)],
        ];
        let kept = [0x6e65_6547, 1, 2, 3];
        let mut entries = [
            entry(0x8000_0001, 0, 0, 0, 0),
            entry(0x8000_0002, 0, 0, 0, 0),
            entry(0x8000_0003, 0, kept[0], 0, 0),
            entry(0x8000_0004, 0, 0, 0, 0),
            entry(0x8000_0005, 0, 0, 0, 0),
        ];
        entries[2].ebx = kept[1];
        entries[2].ecx = kept[2];
        entries[2].edx = kept[3];
        fill_brand_string(&mut entries, &brand);
        let regs = |e: &kvm_cpuid_entry2| [e.eax, e.ebx, e.ecx, e.edx];
        assert_eq!(regs(&entries[0]), [0; 4]);
        assert_eq!(regs(&entries[1]), brand[0]);
        assert_eq!(
            regs(&entries[2]),
            kept,
            "a leaf with a string is the host's choice"
        );
        assert_eq!(regs(&entries[3]), brand[2]);
        assert_eq!(regs(&entries[4]), [0; 4]);
        // The guest reads the name back from the three leaves in order.
        let name: Vec<u8> = [entries[1], entries[3]]
            .iter()
            .flat_map(|e| regs(e).into_iter().flat_map(u32::to_le_bytes))
            .collect();
        assert!(name.starts_with(b"AMD EPYC Process"));
    }

    #[test]
    fn the_hosts_brand_string_is_readable_text() {
        // Every x86_64 host this runs on has the leaves (they date from 2003).
        let brand = host_brand_string().expect("brand-string leaves");
        let bytes: Vec<u8> = brand
            .iter()
            .flatten()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let text = bytes.split(|&b| b == 0).next().unwrap();
        assert!(!text.is_empty() && text.is_ascii(), "{bytes:?}");
    }

    #[test]
    fn no_xcr0_without_xsave_or_leaf_0xd() {
        assert_eq!(
            supported_xcr0(&[entry(0x1, 0, 0, 0, 0), entry(0xd, 0, 0x7, 0, 0)]),
            None
        );
        assert_eq!(
            supported_xcr0(&[entry(0x1, 0, 0, LEAF1_ECX_XSAVE, 0)]),
            None
        );
        assert_eq!(supported_xcr0(&[]), None);
    }
}
