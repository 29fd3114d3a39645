"""The sidewalk network: masks to sidewalk polygons and a routable centerline network, and its scores.

``vectorize.vectorize_raster`` runs one raster (mask, or probabilities with a threshold) through
clean -> skeletonize -> graph -> prune -> join -> simplify -> GeoJSON; ``vectorize.vectorize_run`` does
several rasters and merges them into one network; ``scoring`` compares two line layers.
"""
