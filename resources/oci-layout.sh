# shellcheck shell=bash
# write_oci_layout: make an OCI image layout of one layer. Source it (after lib.sh); do not
# run it. Used by build-debian-image.sh and bench-image.sh.

# write_oci_layout DIR ROOTFS_TAR CONFIG_JSON REF_NAME CREATED_BY
#   DIR          the layout to create (must not exist; its parent must)
#   ROOTFS_TAR   an uncompressed tarball of the root file system; gzip'ed, it becomes the
#                single layer (the tarball itself is left alone)
#   CONFIG_JSON  the image's runtime configuration, the "config" object of the image
#                configuration: e.g. {"Env":["PATH=..."],"Cmd":["sh"]}
#   REF_NAME     the org.opencontainers.image.ref.name annotation in index.json
#   CREATED_BY   the history entry's created_by
# The image is linux/amd64; the manifest is named in index.json with its platform.
write_oci_layout() {
    local dir=$1 tarball=$2 config=$3 ref=$4 created_by=$5
    local blobs=$dir/blobs/sha256 diff_id
    local layer_digest layer_size config_digest config_size manifest_digest manifest_size
    mkdir "$dir" || die "cannot create $dir"
    mkdir -p "$blobs"
    diff_id=sha256:$(sha256sum <"$tarball" | cut -d' ' -f1)
    gzip -6n <"$tarball" >"$dir/layer.tmp"
    read -r layer_digest layer_size < <(_oci_put_blob "$blobs" "$dir/layer.tmp")

    printf '%s' "{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":$config,\
\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"$diff_id\"]},\
\"history\":[{\"created_by\":\"$created_by\"}]}" >"$dir/config.tmp"
    read -r config_digest config_size < <(_oci_put_blob "$blobs" "$dir/config.tmp")

    printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\
\"digest\":\"$config_digest\",\"size\":$config_size},\
\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\
\"digest\":\"$layer_digest\",\"size\":$layer_size}]}" >"$dir/manifest.tmp"
    read -r manifest_digest manifest_size < <(_oci_put_blob "$blobs" "$dir/manifest.tmp")

    printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\
\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"digest\":\"$manifest_digest\",\"size\":$manifest_size,\
\"platform\":{\"architecture\":\"amd64\",\"os\":\"linux\"},\
\"annotations\":{\"org.opencontainers.image.ref.name\":\"$ref\"}}]}" >"$dir/index.json"
    printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
}

# _oci_put_blob BLOBS FILE: move FILE into BLOBS under its digest; prints "DIGEST SIZE".
_oci_put_blob() {
    local hex size
    hex=$(sha256sum <"$2" | cut -d' ' -f1)
    size=$(stat -c %s "$2")
    mv "$2" "$1/$hex"
    echo "sha256:$hex $size"
}

# oci_layer_blobs DIR: the layer blobs of the (single-manifest) layout DIR, in order, one
# path a line.
oci_layer_blobs() {
    local dir=$1 manifest
    manifest=$(grep -o '"digest":"sha256:[0-9a-f]*"' "$dir/index.json" | head -n1 |
        sed 's/.*sha256:\([0-9a-f]*\)"/\1/')
    [ -n "$manifest" ] || die "no manifest in $dir/index.json"
    # The manifest's first digest is its configuration's; the others are the layers'.
    grep -o '"digest":"sha256:[0-9a-f]*"' "$dir/blobs/sha256/$manifest" | tail -n +2 |
        sed "s|.*sha256:\([0-9a-f]*\)\"|$dir/blobs/sha256/\1|"
}
