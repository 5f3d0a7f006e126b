//! EROFS on-disk structures, as defined by the Linux kernel's fs/erofs/erofs_fs.h.
//!
//! Only what an uncompressed image needs: the superblock, compact and extended inodes,
//! inline xattrs and directory blocks. All integers are little-endian.

use crate::error::{Error, Result};
use crate::tree::{Timestamp, Xattr};

pub const BLOCK_SIZE: u64 = 4096;
pub const BLOCK_BITS: u8 = 12;
pub const SUPER_OFFSET: usize = 1024;
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
pub const NAME_LEN: usize = 255;
/// PATH_MAX minus the terminating NUL.
pub const SYMLINK_MAX: usize = 4095;
/// Inodes are addressed in 32-byte slots from the start of the metadata area.
pub const INODE_SLOT: u64 = 32;
pub const COMPACT_INODE_SIZE: usize = 32;
pub const EXTENDED_INODE_SIZE: usize = 64;
pub const DIRENT_SIZE: usize = 12;
/// Largest value of one xattr: the on-disk size field is 16 bits.
pub const XATTR_VALUE_MAX: usize = u16::MAX as usize;
/// Largest inline xattr area of one inode: the header plus 4-byte slots counted in 16 bits.
pub const XATTR_BODY_MAX: usize = XATTR_IBODY_HEADER + 4 * (u16::MAX as usize - 1);
const XATTR_IBODY_HEADER: usize = 12;
const XATTR_ENTRY_HEADER: usize = 4;

/// i_format data layouts.
pub const LAYOUT_FLAT_PLAIN: u16 = 0;
pub const LAYOUT_FLAT_INLINE: u16 = 2;

/// Directory entry file types (the kernel's FT_* values).
pub const FT_REG: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;

pub const S_IFREG: u16 = 0o100000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFLNK: u16 = 0o120000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFIFO: u16 = 0o010000;
pub const S_IFSOCK: u16 = 0o140000;

/// The kernel's new_encode_dev(): 12-bit major, 20-bit minor in 32 bits.
pub fn encode_rdev(major: u32, minor: u32) -> Result<u32> {
    if major > 0xfff || minor > 0xf_ffff {
        return Err(Error::InvalidDevice { major, minor });
    }
    Ok((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// Splits an xattr name into the EROFS prefix index and the stored suffix.
fn xattr_index(name: &[u8]) -> Result<(u8, &[u8])> {
    const PREFIXES: [(&[u8], u8); 3] = [(b"user.", 1), (b"trusted.", 4), (b"security.", 6)];
    let invalid = |reason| {
        Err(Error::InvalidXattrName {
            name: name.to_vec(),
            reason,
        })
    };
    match name {
        b"system.posix_acl_access" => return Ok((2, b"")),
        b"system.posix_acl_default" => return Ok((3, b"")),
        _ => {}
    }
    for (prefix, index) in PREFIXES {
        if let Some(suffix) = name.strip_prefix(prefix) {
            return match suffix.len() {
                0 => invalid("empty name after the prefix"),
                1..=255 if !suffix.contains(&0) => Ok((index, suffix)),
                1..=255 => invalid("contains NUL"),
                _ => invalid("longer than 255 bytes after the prefix"),
            };
        }
    }
    invalid("unknown prefix")
}

/// Validates `xattrs` and returns the size of their inline area (0 when there are none).
pub fn xattr_body_size(xattrs: &[Xattr]) -> Result<usize> {
    if xattrs.is_empty() {
        return Ok(0);
    }
    let mut size = XATTR_IBODY_HEADER;
    for (i, xattr) in xattrs.iter().enumerate() {
        let (_, suffix) = xattr_index(&xattr.name)?;
        if xattrs[..i].iter().any(|x| x.name == xattr.name) {
            return Err(Error::DuplicateXattr {
                name: xattr.name.clone(),
            });
        }
        if xattr.value.len() > XATTR_VALUE_MAX {
            return Err(Error::XattrValueTooLarge {
                name: xattr.name.clone(),
                size: xattr.value.len(),
                max: XATTR_VALUE_MAX,
            });
        }
        size += (XATTR_ENTRY_HEADER + suffix.len() + xattr.value.len()).next_multiple_of(4);
    }
    if size > XATTR_BODY_MAX {
        return Err(Error::XattrsTooLarge {
            size,
            max: XATTR_BODY_MAX,
        });
    }
    Ok(size)
}

/// Appends the inline xattr area of an inode (must have passed [`xattr_body_size`]).
pub fn write_xattr_body(out: &mut Vec<u8>, xattrs: &[Xattr]) {
    if xattrs.is_empty() {
        return;
    }
    // Header: h_reserved, h_shared_count = 0 (no shared xattrs), reserved.
    out.extend_from_slice(&[0; XATTR_IBODY_HEADER]);
    for xattr in xattrs {
        let (index, suffix) = xattr_index(&xattr.name).expect("validated when added to the tree");
        let start = out.len();
        out.push(suffix.len() as u8);
        out.push(index);
        out.extend_from_slice(&(xattr.value.len() as u16).to_le_bytes());
        out.extend_from_slice(suffix);
        out.extend_from_slice(&xattr.value);
        out.resize(start + (out.len() - start).next_multiple_of(4), 0);
    }
}

/// The fields of one on-disk inode.
pub struct Inode {
    pub extended: bool,
    pub layout: u16,
    pub xattr_body_size: usize,
    pub mode: u16,
    pub nlink: u32,
    pub size: u64,
    /// raw_blkaddr for files, directories and symlinks; rdev for devices.
    pub raw: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
}

impl Inode {
    pub fn size_on_disk(&self) -> usize {
        if self.extended {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        }
    }

    fn xattr_icount(&self) -> u16 {
        if self.xattr_body_size == 0 {
            0
        } else {
            (1 + (self.xattr_body_size - XATTR_IBODY_HEADER) / 4) as u16
        }
    }

    /// Appends the inode; the caller checked that compact fields fit when not extended.
    pub fn write(&self, out: &mut Vec<u8>) {
        let format = (self.layout << 1) | u16::from(self.extended);
        out.extend_from_slice(&format.to_le_bytes());
        out.extend_from_slice(&self.xattr_icount().to_le_bytes());
        out.extend_from_slice(&self.mode.to_le_bytes());
        if self.extended {
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&self.size.to_le_bytes());
            out.extend_from_slice(&self.raw.to_le_bytes());
            out.extend_from_slice(&self.ino.to_le_bytes());
            out.extend_from_slice(&self.uid.to_le_bytes());
            out.extend_from_slice(&self.gid.to_le_bytes());
            out.extend_from_slice(&(self.mtime.sec as u64).to_le_bytes());
            out.extend_from_slice(&self.mtime.nsec.to_le_bytes());
            out.extend_from_slice(&self.nlink.to_le_bytes());
            out.extend_from_slice(&[0; 16]);
        } else {
            out.extend_from_slice(&(self.nlink as u16).to_le_bytes());
            out.extend_from_slice(&(self.size as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&self.raw.to_le_bytes());
            out.extend_from_slice(&self.ino.to_le_bytes());
            out.extend_from_slice(&(self.uid as u16).to_le_bytes());
            out.extend_from_slice(&(self.gid as u16).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
    }
}

/// One directory entry as it goes on disk.
pub struct Dirent<'a> {
    pub name: &'a [u8],
    pub nid: u64,
    pub file_type: u8,
}

/// Splits sorted directory entries into blocks: returns the number of entries in each
/// block and the directory's i_size (the last block is only as long as its content).
pub fn pack_dir_blocks(name_lens: impl Iterator<Item = usize>) -> (Vec<usize>, u64) {
    let mut blocks = Vec::new();
    let (mut count, mut used) = (0usize, 0usize);
    for len in name_lens {
        if used + DIRENT_SIZE + len > BLOCK_SIZE as usize {
            blocks.push(count);
            (count, used) = (0, 0);
        }
        count += 1;
        used += DIRENT_SIZE + len;
    }
    blocks.push(count);
    let size = (blocks.len() as u64 - 1) * BLOCK_SIZE + used as u64;
    (blocks, size)
}

/// Serializes one directory block: all dirents first, then the names back to back.
/// Blocks other than the last are zero-padded to the block size.
pub fn write_dir_block(out: &mut Vec<u8>, entries: &[Dirent], pad: bool) {
    let start = out.len();
    let mut nameoff = entries.len() * DIRENT_SIZE;
    for entry in entries {
        out.extend_from_slice(&entry.nid.to_le_bytes());
        out.extend_from_slice(&(nameoff as u16).to_le_bytes());
        out.push(entry.file_type);
        out.push(0);
        nameoff += entry.name.len();
    }
    for entry in entries {
        out.extend_from_slice(entry.name);
    }
    if pad {
        out.resize(start + BLOCK_SIZE as usize, 0);
    }
}

/// Superblock fields that vary between images.
pub struct SuperBlock {
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: Timestamp,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
}

impl SuperBlock {
    /// The whole first block of the image: zeros, then the superblock at byte 1024,
    /// with its crc32c over the rest of the block (EROFS_FEATURE_COMPAT_SB_CHKSUM).
    pub fn block(&self) -> Vec<u8> {
        let mut sb = Vec::with_capacity(128);
        sb.extend_from_slice(&SUPER_MAGIC.to_le_bytes());
        sb.extend_from_slice(&0u32.to_le_bytes()); // checksum, filled below
        sb.extend_from_slice(&FEATURE_COMPAT_SB_CHKSUM.to_le_bytes());
        sb.push(BLOCK_BITS);
        sb.push(0); // sb_extslots
        sb.extend_from_slice(&self.root_nid.to_le_bytes());
        sb.extend_from_slice(&self.inos.to_le_bytes());
        sb.extend_from_slice(&(self.build_time.sec as u64).to_le_bytes());
        sb.extend_from_slice(&self.build_time.nsec.to_le_bytes());
        sb.extend_from_slice(&self.blocks.to_le_bytes());
        sb.extend_from_slice(&self.meta_blkaddr.to_le_bytes());
        sb.extend_from_slice(&0u32.to_le_bytes()); // xattr_blkaddr: no shared xattrs
        sb.extend_from_slice(&self.uuid);
        sb.extend_from_slice(&self.volume_name);
        sb.extend_from_slice(&0u32.to_le_bytes()); // feature_incompat: none needed
        sb.resize(128, 0); // compression, devices, dirblkbits = 0, packed_nid, reserved
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        block[SUPER_OFFSET..SUPER_OFFSET + sb.len()].copy_from_slice(&sb);
        // The kernel computes crc32c(~0, ...) without the final inversion.
        let crc = crc32c_update(!0, &block[SUPER_OFFSET..]);
        block[SUPER_OFFSET + 4..SUPER_OFFSET + 8].copy_from_slice(&crc.to_le_bytes());
        block
    }
}

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// Raw CRC-32C (Castagnoli) update, as the kernel's crc32c(seed, data).
pub fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // CRC-32C("123456789") = 0xE3069283 with the usual final inversion.
        assert_eq!(!crc32c_update(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn rdev_encoding_matches_new_encode_dev() {
        assert_eq!(encode_rdev(1, 3).unwrap(), 0x103);
        assert_eq!(
            encode_rdev(8, 0x12345).unwrap(),
            0x45 | (8 << 8) | (0x12300 << 12)
        );
        assert!(encode_rdev(0x1000, 0).is_err());
        assert!(encode_rdev(0, 0x10_0000).is_err());
    }

    #[test]
    fn xattr_sizes_and_prefixes() {
        assert_eq!(xattr_body_size(&[]).unwrap(), 0);
        // 12-byte header + align4(4 + "capability" (10) + 20) = 12 + 36.
        let cap = Xattr::new("security.capability", vec![0; 20]);
        assert_eq!(xattr_body_size(std::slice::from_ref(&cap)).unwrap(), 48);
        let acl = Xattr::new("system.posix_acl_access", vec![0; 4]);
        assert_eq!(xattr_body_size(&[acl]).unwrap(), 12 + 8);
        assert!(matches!(
            xattr_body_size(&[cap.clone(), cap]),
            Err(Error::DuplicateXattr { .. })
        ));
        for bad in ["user.", "system.foo", "foo", "trusted."] {
            let r = xattr_body_size(&[Xattr::new(bad, "v")]);
            assert!(matches!(r, Err(Error::InvalidXattrName { .. })), "{bad}");
        }
        let big = Xattr::new("user.big", vec![0; XATTR_VALUE_MAX + 1]);
        assert!(matches!(
            xattr_body_size(&[big]),
            Err(Error::XattrValueTooLarge { .. })
        ));
        let many: Vec<_> = (0..5)
            .map(|i| Xattr::new(format!("user.{i}"), vec![0; 60000]))
            .collect();
        assert!(matches!(
            xattr_body_size(&many),
            Err(Error::XattrsTooLarge { .. })
        ));
    }

    #[test]
    fn dir_blocks_split_where_the_next_entry_does_not_fit() {
        // 4096 / (12 + 4) = 256 entries of 4-byte names fill one block exactly.
        let (blocks, size) = pack_dir_blocks(std::iter::repeat_n(4, 256));
        assert_eq!((blocks, size), (vec![256], 4096));
        let (blocks, size) = pack_dir_blocks(std::iter::repeat_n(4, 257));
        assert_eq!((blocks, size), (vec![256, 1], 4096 + 16));
    }

    #[test]
    fn superblock_layout() {
        let sb = SuperBlock {
            root_nid: 7,
            inos: 3,
            build_time: Timestamp { sec: 5, nsec: 6 },
            blocks: 9,
            meta_blkaddr: 2,
            uuid: [1; 16],
            volume_name: *b"kiln\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        let block = sb.block();
        let sb = &block[SUPER_OFFSET..];
        assert_eq!(&sb[0..4], &SUPER_MAGIC.to_le_bytes());
        assert_eq!(sb[12], 12);
        assert_eq!(&sb[14..16], &7u16.to_le_bytes());
        assert_eq!(&sb[40..44], &2u32.to_le_bytes());
        let mut zeroed = sb.to_vec();
        zeroed[4..8].fill(0);
        assert_eq!(&sb[4..8], &crc32c_update(!0, &zeroed).to_le_bytes());
    }
}
