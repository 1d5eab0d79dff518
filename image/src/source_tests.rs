use std::fs;

use serde_json::json;

use super::*;
use crate::testutil::*;

fn layer(name: &str, data: &[u8]) -> Vec<u8> {
    Tar::new().file(name, 0o644, data).bytes()
}

#[test]
fn an_oci_layout_yields_manifest_config_and_ordered_layers() {
    let dir = crate::testutil::tempdir();
    let layers = [layer("a", b"1"), layer("b", b"2")];
    let m = write_image(dir.path(), "amd64", &layers, json!({"Cmd": ["sh"]}));
    write_index(dir.path(), vec![manifest_desc(&m, None)]);
    let src = ImageSource::open_layout(dir.path()).unwrap();
    let img = src.image();
    assert_eq!(img.manifest_digest, Digest::of(&m));
    assert_eq!(img.layers.len(), 2);
    assert_eq!(img.layers[0].compression, Compression::Gzip);
    assert_eq!(img.layers[0].diff_id, Some(Digest::of(&layers[0])));
    assert_eq!(img.layers[1].diff_id, Some(Digest::of(&layers[1])));
    assert_eq!(
        img.config.config().as_ref().unwrap().cmd().as_deref(),
        Some(&["sh".to_string()][..])
    );
    let mut blob = Vec::new();
    src.open_blob(&img.layers[1].digest)
        .unwrap()
        .read_to_end(&mut blob)
        .unwrap();
    assert_eq!(Digest::of(&blob), img.layers[1].digest);
}

#[test]
fn a_multi_platform_index_resolves_to_linux_amd64() {
    let dir = crate::testutil::tempdir();
    let arm = write_image(dir.path(), "arm64", &[layer("arm", b"")], json!({}));
    let amd = write_image(dir.path(), "amd64", &[layer("amd", b"")], json!({}));
    let s390 = write_image(dir.path(), "s390x", &[layer("s390", b"")], json!({}));
    let attestation = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": Digest::of(&s390).to_string(), "size": s390.len(),
        "platform": {"os": "unknown", "architecture": "unknown"},
    });
    let sub = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_desc(&arm, Some(("linux", "arm64"))), attestation, manifest_desc(&amd, Some(("linux", "amd64")))],
    }))
    .unwrap();
    let sub_digest = put(dir.path(), &sub);
    write_index(
        dir.path(),
        vec![
            json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": sub_digest.to_string(), "size": sub.len()}),
        ],
    );
    let src = ImageSource::open_layout(dir.path()).unwrap();
    assert_eq!(src.image().manifest_digest, Digest::of(&amd));
    assert_eq!(*src.image().config.architecture(), Arch::Amd64);

    // Without an amd64 image, the index is refused in one sentence.
    let only_arm = crate::testutil::tempdir();
    let arm = write_image(only_arm.path(), "arm64", &[layer("arm", b"")], json!({}));
    write_index(
        only_arm.path(),
        vec![manifest_desc(&arm, Some(("linux", "arm64")))],
    );
    let err = ImageSource::open_layout(only_arm.path()).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!("{} has no image for linux/amd64", only_arm.path().display())
    );
}

#[test]
fn a_tampered_manifest_or_config_is_refused() {
    let dir = crate::testutil::tempdir();
    let m = write_image(dir.path(), "amd64", &[layer("a", b"")], json!({}));
    write_index(dir.path(), vec![manifest_desc(&m, None)]);
    let md = Digest::of(&m);
    let mut bad = m.clone();
    bad.extend_from_slice(b" ");
    fs::write(dir.path().join("blobs/sha256").join(md.hex()), &bad).unwrap();
    let err = ImageSource::open_layout(dir.path()).err().unwrap();
    assert!(matches!(err, SourceError::DigestMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("manifest {md} in")),
        "{err}"
    );
}

#[test]
fn several_images_without_platforms_are_refused() {
    let dir = crate::testutil::tempdir();
    let a = write_image(dir.path(), "amd64", &[layer("a", b"")], json!({}));
    let b = write_image(dir.path(), "amd64", &[layer("b", b"")], json!({}));
    write_index(
        dir.path(),
        vec![manifest_desc(&a, None), manifest_desc(&b, None)],
    );
    let err = ImageSource::open_layout(dir.path()).err().unwrap();
    assert!(
        matches!(err, SourceError::SeveralImages { count: 2, .. }),
        "{err}"
    );
}

#[test]
fn an_oci_archive_reads_like_its_layout_even_gzipped() {
    let dir = crate::testutil::tempdir();
    let layout = dir.path().join("layout");
    fs::create_dir(&layout).unwrap();
    let m = write_image(
        &layout,
        "amd64",
        &[layer("a", b"x"), layer("b", b"y")],
        json!({}),
    );
    write_index(&layout, vec![manifest_desc(&m, Some(("linux", "amd64")))]);
    let archive = dir.path().join("image.tar");
    tar_dir(&layout, &archive);
    let src = ImageSource::open_archive(&archive).unwrap();
    assert_eq!(src.image().manifest_digest, Digest::of(&m));
    let gz = dir.path().join("image.tar.gz");
    fs::write(&gz, gzip(&fs::read(&archive).unwrap())).unwrap();
    let src = ImageSource::open_archive(&gz).unwrap();
    assert_eq!(src.image().manifest_digest, Digest::of(&m));
    for l in &src.image().layers {
        let mut v = Vec::new();
        src.open_blob(&l.digest)
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        assert_eq!(Digest::of(&v), l.digest);
    }
}

/// A `docker save` tarball as Docker before 25 writes it: uncompressed layer tars in per-layer
/// directories, `<config digest>.json`, and `manifest.json`; `legacy_links` makes the layer tars
/// symbolic links to `blobs/sha256/...` as newer Docker does.
fn docker_save(out: &Path, layers: &[Vec<u8>], legacy_links: bool) -> Vec<u8> {
    let diff_ids: Vec<Digest> = layers.iter().map(|l| Digest::of(l)).collect();
    let cfg = config_json(
        "amd64",
        &diff_ids,
        json!({"Entrypoint": ["/bin/app"], "Env": ["A=1"], "Volumes": null}),
    );
    let cfg_name = format!("{}.json", Digest::of(&cfg).hex());
    let mut t = Tar::new();
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        if legacy_links {
            let blob = format!("blobs/sha256/{}", Digest::of(l).hex());
            t.file(&blob, 0o644, l);
            t.symlink(&name, &format!("../{blob}"));
        } else {
            t.file(&name, 0o644, l);
        }
        names.push(name);
    }
    t.file(&cfg_name, 0o644, &cfg);
    let manifest = serde_json::to_vec(
        &json!([{"Config": cfg_name, "RepoTags": ["test:latest"], "Layers": names}]),
    )
    .unwrap();
    t.file("manifest.json", 0o644, &manifest);
    fs::write(out, t.bytes()).unwrap();
    cfg
}

#[test]
fn a_docker_save_tarball_yields_its_image() {
    let dir = crate::testutil::tempdir();
    for links in [false, true] {
        let path = dir.path().join(format!("save-{links}.tar"));
        let layers = [layer("a", b"1"), layer("b", b"22")];
        let cfg = docker_save(&path, &layers, links);
        let src = ImageSource::open_archive(&path).unwrap();
        let img = src.image();
        assert_eq!(img.config_digest, Digest::of(&cfg));
        assert_eq!(img.layers.len(), 2);
        for (l, data) in img.layers.iter().zip(&layers) {
            assert_eq!(l.digest, Digest::of(data));
            assert_eq!(l.diff_id, Some(Digest::of(data)));
            assert_eq!(l.compression, Compression::None);
            assert_eq!(l.size, data.len() as u64);
        }
        let c = img.config.config().as_ref().unwrap();
        assert_eq!(
            c.entrypoint().as_deref(),
            Some(&["/bin/app".to_string()][..])
        );
        // The made-up manifest names the layers and the configuration by digest.
        assert_eq!(Digest::of(&img.manifest_bytes), img.manifest_digest);
    }
}

#[test]
fn non_images_are_refused_in_one_sentence() {
    let dir = crate::testutil::tempdir();
    let err = ImageSource::open_layout(dir.path()).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "{} is not an OCI image layout (it has no oci-layout and index.json)",
            dir.path().display()
        )
    );
    let t = dir.path().join("x.tar");
    fs::write(&t, Tar::new().file("hello", 0o644, b"").bytes()).unwrap();
    let err = ImageSource::open_archive(&t).err().unwrap();
    assert!(matches!(err, SourceError::NotArchive(_)), "{err}");
}
