def strip_trailing_slashes(result, generator, request, public):
    """The routes accept an optional trailing slash; document them the way the README writes them."""
    result["paths"] = {path.rstrip("/") or path: item for path, item in result["paths"].items()}
    return result
