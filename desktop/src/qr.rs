//! QR codes for the pairing ticket (DESIGN.md §7).
//!
//! - [`render_unicode`] draws the code in the terminal for `errand pair`, two modules per
//!   character cell, with colours chosen for a dark terminal.
//! - [`write_png`] and [`write_svg`] save it as a file, for terminals that cannot show it or for
//!   sharing a screenshot-free image.
//!
//! All three use error correction level M (15 % recovery): the ticket text is short, and M keeps
//! the code small enough to scan from a laptop screen while surviving glare and a bit of blur.
//!
//! The ticket text holds a one-time secret, so files are created readable by the owner only.

use std::{fs, io, path::Path};

use qrcode::{
    EcLevel, QrCode,
    render::{svg, unicode::Dense1x2},
};

/// Error correction level for every code we draw; see the module docs.
const EC_LEVEL: EcLevel = EcLevel::M;

/// Smallest PNG side in pixels. The renderer picks the smallest whole number of pixels per
/// module that reaches it: 5 px for a typical two-address ticket (version 11, 61 modules plus
/// the quiet zone), which any phone camera reads from a screen.
const MIN_PNG_SIDE: u32 = 300;

/// Smallest SVG side in user units; SVG scales, so this only sets the default display size.
const MIN_SVG_SIDE: u32 = 300;

/// Why a QR code could not be made or saved.
#[derive(Debug, thiserror::Error)]
pub enum QrError {
    /// The text does not fit in a QR code (more than about 2.3 KB at level M).
    #[error("cannot encode {len} bytes as a QR code")]
    Encode {
        /// Length of the text in bytes.
        len: usize,
        /// The encoder's reason.
        #[source]
        source: qrcode::types::QrError,
    },
    /// The image could not be encoded as PNG.
    #[error("while encoding the QR code as PNG")]
    Image(#[source] image::ImageError),
    /// The file could not be written.
    #[error("while writing the QR code to {path}")]
    Io {
        /// The file being written.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Encodes `text` as a QR code at level M.
fn encode(text: &str) -> Result<QrCode, QrError> {
    QrCode::with_error_correction_level(text.as_bytes(), EC_LEVEL).map_err(|source| {
        QrError::Encode {
            len: text.len(),
            source,
        }
    })
}

/// Renders `text` as a QR code made of Unicode half blocks, with the quiet zone, one line per
/// two rows of modules.
///
/// Dark modules are spaces and light modules are blocks, so the code scans on a terminal that
/// draws light text on a dark background (the common case). Lines are joined with `\n` and
/// have no trailing newline.
pub fn render_unicode(text: &str) -> Result<String, QrError> {
    Ok(encode(text)?
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// Writes `text` as a black-on-white greyscale PNG of at least 300×300 pixels to `path`,
/// replacing any file there. The file is readable by the owner only (mode 0600 on Unix).
pub fn write_png(text: &str, path: &Path) -> Result<(), QrError> {
    let img = encode(text)?
        .render::<image::Luma<u8>>()
        .quiet_zone(true)
        .min_dimensions(MIN_PNG_SIDE, MIN_PNG_SIDE)
        .build();
    let mut png = io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .map_err(QrError::Image)?;
    write_private(path, png.get_ref())
}

/// Writes `text` as a black-on-white SVG to `path`, replacing any file there. The file is
/// readable by the owner only (mode 0600 on Unix).
pub fn write_svg(text: &str, path: &Path) -> Result<(), QrError> {
    let svg = encode(text)?
        .render::<svg::Color<'_>>()
        .quiet_zone(true)
        .min_dimensions(MIN_SVG_SIDE, MIN_SVG_SIDE)
        .dark_color(svg::Color("#000000"))
        .light_color(svg::Color("#ffffff"))
        .build();
    write_private(path, svg.as_bytes())
}

/// Writes `bytes` to `path`, creating or truncating it, readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), QrError> {
    let io_err = |source| QrError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io_err)?;
    // `mode` only applies to new files; tighten a file that was already there.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err)?;
    }
    io::Write::write_all(&mut file, bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use errand_core::{DeviceId, Ticket};

    use super::*;

    /// A realistic ticket: Ed25519 PeerId, a LAN address and a relay circuit address.
    fn ticket_text() -> String {
        let desktop: DeviceId = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
            .parse()
            .unwrap();
        let relay = "/ip4/203.0.113.7/tcp/4001/p2p/\
                     12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5nLZRb2wNasA4r5w7Xp/p2p-circuit";
        Ticket::new(
            desktop,
            ["/ip4/192.168.1.5/tcp/40001", relay],
            600_000,
            1_700_000_000_000,
        )
        .to_string()
    }

    /// Decodes every QR code found in an image.
    fn decode_all<G: rqrr::BitGrid>(grids: Vec<rqrr::Grid<G>>) -> Vec<String> {
        grids.iter().map(|grid| grid.decode().unwrap().1).collect()
    }

    #[test]
    fn png_decodes_back_to_the_ticket_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pair.png");
        let text = ticket_text();
        write_png(&text, &path).unwrap();

        let img = image::open(&path).unwrap().to_luma8();
        assert!(img.width() >= MIN_PNG_SIDE && img.height() >= MIN_PNG_SIDE);
        let code = encode(&text).unwrap();
        println!(
            "{} chars -> QR version {:?}, {} modules, {}x{} px",
            text.len(),
            code.version(),
            code.width(),
            img.width(),
            img.height()
        );
        let mut prepared = rqrr::PreparedImage::prepare(img);
        assert_eq!(decode_all(prepared.detect_grids()), vec![text]);
    }

    #[test]
    fn png_file_is_private_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pair.png");
        fs::write(&path, b"old contents that are longer than nothing").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        }
        write_png("errand:TEST", &path).unwrap();
        assert!(fs::read(&path).unwrap().starts_with(b"\x89PNG"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn svg_file_is_an_svg_document() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pair.svg");
        write_svg(&ticket_text(), &path).unwrap();
        let svg = fs::read_to_string(&path).unwrap();
        assert!(
            svg.starts_with("<?xml") || svg.starts_with("<svg"),
            "{}",
            &svg[..40]
        );
        assert!(svg.contains("#000000"));
    }

    #[test]
    fn unicode_render_scans_as_light_blocks_on_a_dark_terminal() {
        let text = ticket_text();
        let art = render_unicode(&text).unwrap();
        assert!(!art.is_empty());
        println!("{art}");

        // Rebuild the bitmap a dark terminal shows: block glyphs are light, spaces are dark.
        let rows: Vec<Vec<char>> = art.lines().map(|l| l.chars().collect()).collect();
        let width = rows[0].len();
        assert!(rows.iter().all(|r| r.len() == width));
        let scale = 4;
        let is_dark = |x: usize, y: usize| {
            let (col, row) = (x / scale, y / scale);
            let glyph = rows[row / 2][col];
            let (top_light, bottom_light) = match glyph {
                ' ' => (false, false),
                '\u{2584}' => (false, true),
                '\u{2580}' => (true, false),
                '\u{2588}' => (true, true),
                other => panic!("unexpected glyph {other:?}"),
            };
            !if row % 2 == 0 {
                top_light
            } else {
                bottom_light
            }
        };
        // The quiet zone must be light, i.e. drawn with blocks.
        assert!(rows[0].iter().all(|&c| c == '\u{2588}'));
        let mut img = rqrr::PreparedImage::prepare_from_bitmap(
            width * scale,
            rows.len() * 2 * scale,
            is_dark,
        );
        assert_eq!(decode_all(img.detect_grids()), vec![text]);
    }

    #[test]
    fn text_too_long_for_a_qr_code_is_an_encode_error() {
        let err = render_unicode(&"x".repeat(10_000)).unwrap_err();
        assert!(matches!(err, QrError::Encode { len: 10_000, .. }), "{err}");
    }
}
