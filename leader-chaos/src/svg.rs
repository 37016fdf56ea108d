//! The one SVG writer and colour palette of the workspace's pictures (the chaos timelines
//! here, leader-bench's charts): plotters' SVG backend drawn into a string, then written.

use std::error::Error;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

/// Errors from drawing or writing a picture (the cause is kept as the source).
pub type DrawResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Series colours, told apart with colour blindness too (Okabe–Ito and Tableau tones; no
/// red: red is kept for what failed, goals and overlaps).
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(0x00, 0x72, 0xB2),
    RGBColor(0xE6, 0x9F, 0x00),
    RGBColor(0x00, 0x9E, 0x73),
    RGBColor(0xCC, 0x79, 0xA7),
    RGBColor(0x56, 0xB4, 0xE9),
    RGBColor(0x94, 0x67, 0xBD),
    RGBColor(0x8C, 0x56, 0x4B),
    RGBColor(0x17, 0xBE, 0xCF),
];

/// The red of what failed (an overlap, a goal line).
pub const RED: RGBColor = RGBColor(0xD6, 0x00, 0x00);

/// The palette's colour for series `index` (cycling).
pub fn colour(index: usize) -> RGBColor {
    PALETTE[index % PALETTE.len()]
}

/// Draws a `size` picture on a white background with `draw`, and returns the SVG document.
///
/// # Errors
///
/// Whatever `draw` or plotters returns.
pub fn draw_svg(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult<()>,
) -> DrawResult<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    Ok(svg)
}

/// Writes an SVG document to `path`, creating its folder.
///
/// # Errors
///
/// If the folder or the file cannot be written.
pub fn write_file(path: &Path, svg: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, svg)
}

/// [`draw_svg`], then [`write_file`].
///
/// # Errors
///
/// As theirs.
pub fn write_svg(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult<()>,
) -> DrawResult<()> {
    let svg = draw_svg(size, draw)?;
    write_file(path, &svg)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picture_is_drawn_and_written_into_a_new_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a").join("b.svg");
        write_svg(&path, (200, 100), |root| {
            root.draw(&Rectangle::new([(10, 10), (50, 50)], colour(9).filled()))?;
            Ok(())
        })
        .expect("drawn");
        let svg = std::fs::read_to_string(&path).expect("written");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("#E69F00"), "colour 9 is colour 1");
    }
}
