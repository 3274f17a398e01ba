#!/usr/bin/env bash
# Regenerates src/generated/ from the .proto files with tonic-build. The
# generated code is committed so that building Gatehouse needs no protoc;
# run this (it needs protoc, Debian's protobuf-compiler) after editing a
# .proto file.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
cat > "$work/Cargo.toml" <<TOML
[package]
name = "gatehouse-proto-gen"
version = "0.0.0"
edition = "2021"
[dependencies]
tonic-build = { version = "0.13", default-features = false, features = ["prost", "transport"] }
[workspace]
TOML
cat > "$work/src/main.rs" <<RS
fn main() {
    tonic_build::configure()
        .out_dir("$root/src/generated")
        .compile_protos(&["$root/gatehouse/sync/v1/sync.proto"], &["$root"])
        .expect("generate");
}
RS
cargo run --quiet --manifest-path "$work/Cargo.toml"
