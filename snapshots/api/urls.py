from dumont.core.routers import Router
from snapshots.api import views

router = Router()
router.register("snapshots", views.SnapshotViewSet, basename="snapshot")
urlpatterns = router.urls
