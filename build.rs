fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // tests/c_abi.rs drives the C compiler through the `cc` crate, which needs the target and host triples;
    // outside a build script they exist only if we pass them on.
    for var in ["TARGET", "HOST"] {
        let v = std::env::var(var).unwrap_or_default();
        println!("cargo:rustc-env=COMPRESSKV_{var}={v}");
    }
}
