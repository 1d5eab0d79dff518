//! The boot GDT and segment descriptors.
//!
//! A segment descriptor packs its fields as follows (Intel SDM vol. 3, 3.4.5):
//!
//! | bits  | field                                   |
//! |-------|-----------------------------------------|
//! | 0-15  | limit 15:0                              |
//! | 16-39 | base 23:0                               |
//! | 40-43 | type                                    |
//! | 44    | S (code/data rather than system)        |
//! | 45-46 | DPL                                     |
//! | 47    | P (present)                             |
//! | 48-51 | limit 19:16                             |
//! | 52    | AVL                                     |
//! | 53    | L (64-bit code)                         |
//! | 54    | D/B (32-bit default operand size)       |
//! | 55    | G (limit in 4 KiB units)                |
//! | 56-63 | base 31:24                              |
//!
//! The `flags` argument of [`gdt_entry`] holds bits 40-55 of the descriptor, i.e. the access
//! byte in its low byte and G/DB/L/AVL in its top nibble (e.g. `0xa09b` for 64-bit code); its
//! bits 8-11 (where the descriptor keeps limit 19:16) are ignored.

use kvm_bindings::kvm_segment;

/// A GDT entry from flags, base and limit (the classic x86 packed layout).
///
/// `flags` is the access byte plus, in bits 12-15, the G/DB/L/AVL flags; `limit` is the raw
/// 20-bit limit (in bytes, or in 4 KiB pages when G is set).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// One bit of `entry` as a `u8`.
const fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

/// The `kvm_segment` that a GDT entry at `table_index` describes.
///
/// The limit is returned in bytes: with G set the 20-bit page limit is scaled to 4 KiB pages
/// (`limit << 12 | 0xfff`). The selector is `table_index * 8` (GDT, RPL 0), and a segment that is
/// not present is marked unusable.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = bit(entry, 55);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(entry, 47);
    kvm_segment {
        base,
        limit,
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g,
        avl: bit(entry, 52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_flat_64_bit_code() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn encodes_flat_32_bit_code_and_data() {
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn encodes_base_and_limit() {
        let e = gdt_entry(0x008b, 0x1234_5678, 0x67);
        assert_eq!(e, 0x1200_8b34_5678_0067);
        // Limit bits above 19 and flag bits 8-11 are dropped.
        assert_eq!(
            gdt_entry(0x0f8b, 0, 0xfff0_0067),
            gdt_entry(0x008b, 0, 0x67)
        );
        assert_eq!(gdt_entry(0, 0, 0), 0);
    }

    #[test]
    fn decodes_64_bit_code() {
        let s = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.selector, 0x8);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.present, 1);
        assert_eq!(s.dpl, 0);
        assert_eq!(s.db, 0);
        assert_eq!(s.s, 1);
        assert_eq!(s.l, 1);
        assert_eq!(s.g, 1);
        assert_eq!(s.avl, 0);
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn decodes_32_bit_code() {
        let s = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.db, 1);
        assert_eq!(s.l, 0);
        assert_eq!(s.g, 1);
        assert_eq!(s.s, 1);
        assert_eq!(s.present, 1);
    }

    #[test]
    fn decodes_data() {
        let s = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(s.selector, 0x10);
        assert_eq!(s.type_, 0x3);
        assert_eq!(s.db, 1);
        assert_eq!(s.l, 0);
        assert_eq!(s.g, 1);
        assert_eq!(s.s, 1);
        assert_eq!(s.present, 1);
        assert_eq!(s.unusable, 0);
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn decodes_tss_without_granularity() {
        let s = segment_from_gdt(gdt_entry(0x008b, 0x0012_3000, 0x67), 3);
        assert_eq!(s.base, 0x0012_3000);
        assert_eq!(s.limit, 0x67);
        assert_eq!(s.selector, 0x18);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.s, 0);
        assert_eq!(s.g, 0);
        assert_eq!(s.present, 1);
    }

    #[test]
    fn decodes_dpl_avl_and_high_base() {
        // DPL 3, AVL set, base using all 32 bits, granular limit 0x12345 pages.
        let s = segment_from_gdt(gdt_entry(0x90f3, 0xdead_beef, 0x12345), 5);
        assert_eq!(s.base, 0xdead_beef);
        assert_eq!(s.limit, 0x1234_5fff);
        assert_eq!(s.dpl, 3);
        assert_eq!(s.avl, 1);
        assert_eq!(s.g, 1);
        assert_eq!(s.db, 0);
        assert_eq!(s.selector, 40);
    }

    #[test]
    fn null_and_not_present_segments_are_unusable() {
        let s = segment_from_gdt(0, 0);
        assert_eq!(s.present, 0);
        assert_eq!(s.unusable, 1);
        let s = segment_from_gdt(gdt_entry(0xc013, 0, 0xfffff), 2);
        assert_eq!(s.present, 0);
        assert_eq!(s.unusable, 1);
    }

    #[test]
    fn round_trips() {
        for (flags, base, limit) in [
            (0xa09b_u16, 0_u32, 0xfffff_u32),
            (0xc093, 0x1000, 0xabcde),
            (0x008b, 0xffff_ffff, 0x67),
            (0x40f2, 0x00ab_cdef, 0x1),
        ] {
            let s = segment_from_gdt(gdt_entry(flags, base, limit), 7);
            assert_eq!(s.base, u64::from(base));
            let expected_limit = if flags & 0x8000 != 0 {
                (limit << 12) | 0xfff
            } else {
                limit
            };
            assert_eq!(s.limit, expected_limit);
            let access = (flags & 0xff) as u8;
            assert_eq!(s.type_, access & 0xf);
            assert_eq!(s.s, (access >> 4) & 1);
            assert_eq!(s.dpl, (access >> 5) & 3);
            assert_eq!(s.present, access >> 7);
            assert_eq!(s.avl, ((flags >> 12) & 1) as u8);
            assert_eq!(s.l, ((flags >> 13) & 1) as u8);
            assert_eq!(s.db, ((flags >> 14) & 1) as u8);
            assert_eq!(s.g, ((flags >> 15) & 1) as u8);
        }
    }
}
