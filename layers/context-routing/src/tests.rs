use super::*;

#[test]
fn default_catalog_parses() {
    let models = default_catalog();
    assert_eq!(models.len(), 11);
}
