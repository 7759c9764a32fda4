from dumont.core.routers import Router
from snapshots.api import views

router = Router()
# /snapshots itself is routed by instances.api.urls: its write routes need an instance (see views.py)
router.register("snapshot-restores", views.SnapshotRestoreViewSet, basename="snapshot-restore")
urlpatterns = router.urls
