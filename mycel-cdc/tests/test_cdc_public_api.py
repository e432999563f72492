import mycel_cdc


def test_all_lists_the_public_names_sorted():
    public = sorted(
        name
        for name in vars(mycel_cdc)
        if not name.startswith("_") and name not in {"annotations"}
    )
    assert mycel_cdc.__all__ == sorted(mycel_cdc.__all__)
    assert sorted(mycel_cdc.__all__) == public


def test_plugin_registers_the_cdc_type():
    from mycel.testing import registry

    reg = registry()
    assert reg.connector_types["cdc"] is mycel_cdc.CdcConnector
