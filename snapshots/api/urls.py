from dumont.core.routers import Router
from snapshots.api import views

router = Router()
router.register("snapshots", views.SnapshotViewSet, basename="snapshot")
router.register("snapshot-restores", views.SnapshotRestoreViewSet, basename="snapshot-restore")
urlpatterns = router.urls
