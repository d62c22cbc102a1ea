//! The desktop's config file: a refusal is an error value (with its line), and settings that
//! parse print back to a file that parses to the same settings.
#![no_main]

use std::path::Path;

use errand_desktop::config::Settings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (home, path) = (Path::new("/h"), Path::new("/h/config.toml"));
    let Ok(settings) = Settings::parse(home, path, text) else {
        return;
    };
    let printed = settings.to_string();
    let again = Settings::parse(home, path, &printed)
        .unwrap_or_else(|e| panic!("printed settings do not parse: {e}\n{printed}"));
    assert_eq!(again, settings, "{printed}");
});
